#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv; quiet when nothing changed.
# This is also test lane 1: Python 3.11, megatron-core 0.16.1, torch 2.13.0's CPU wheel (torch is
# installed first so pip takes the CPU wheel instead of a multi-GB CUDA build). setup.py asks for
# ranges; the pins below, installed first and kept by a constraints file, choose the lane's versions.
# ruff is the linter tests/run.sh runs before the tests (its configuration: ruff.toml).
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$self")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
PINS=(torch==2.13.0 megatron-core==0.16.1 ruff==0.17.6)
stamp=.venv/.installed-$({ printf '%s\n' "${PINS[@]}"; cat setup.py "$self"; cat pyproject.toml 2>/dev/null || true; } | sha256sum | cut -c1-16)
if [[ -f "$stamp" ]]; then
  exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version) and installing megatron-grouter (first run only)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip
printf '%s\n' "${PINS[@]}" > .venv/.constraints.txt
"${pip[@]}" install "${PINS[@]}"
"${pip[@]}" install -c .venv/.constraints.txt -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done"
