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

# Every install takes its versions from the lock (pip constraints), so a fresh machine gets the known-good set
# today and later; pyproject.toml only states ranges. scripts/check-latest moves the lock.
LOCK=scripts/lock.txt

# Re-install only when the declared dependencies, the install steps or the lock change.
INPUTS=(pyproject.toml scripts/setup.sh scripts/install-set.sh "$LOCK")
STAMP=".venv/.pathway-installed-$(cat "${INPUTS[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    echo "[setup] installing the locked set ($LOCK) into .venv (first run: several minutes)"
    bash scripts/install-set.sh .venv -c "$LOCK"
    rm -f .venv/.pathway-installed-*
    touch "$STAMP"
fi
