#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv; quiet when nothing changed.
# torch is pinned to 2.13.0 first so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.installed-$(sha256sum setup.py | cut -c1-16)
if [[ -f "$stamp" ]]; then
  exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version) and installing megatron-grouter (first run only)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done"
