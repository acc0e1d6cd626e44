#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv; quiet when nothing changed.
# This is also test lane 1 (Python 3.11, megatron-core 0.16.1 from setup.py, the CPU torch wheel).
# torch is pinned to 2.13.0 first so pip takes the CPU wheel instead of a multi-GB CUDA build;
# ruff is the linter tests/run.sh runs before the tests (its configuration: ruff.toml).
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$self")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.installed-$(cat setup.py "$self" | sha256sum | cut -c1-16)
if [[ -f "$stamp" ]]; then
  exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version) and installing megatron-grouter (first run only)"
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]" ruff==0.17.6
rm -f .venv/.installed-*
touch "$stamp"
echo "[setup] done"
