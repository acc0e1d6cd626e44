#!/usr/bin/env bash
# The test suite, on any machine (no GPU needed), in two lanes one after the other:
#   lane 1  Python 3.11, megatron-core 0.16.1, torch 2.13.0 CPU wheel     .venv (launch/setup_env.sh)
#   lane 2  Python 3.12, megatron-core 0.19.2, torch 2.13.0 from the index
#           a cached venv outside the clone (launch/setup_lane2_env.sh prints where)
# ruff (ruff.toml) checks the code first; then each lane runs pytest with the arguments given.
#
#   bash tests/run.sh                         ruff, then the full suite on lane 1, then on lane 2
#   bash tests/run.sh --lane 2 tests/data -x  one lane (also MG_LANES=2); the rest goes to pytest
#   MG_LINT=0 bash tests/run.sh ...           without ruff
#
# Exits non-zero when ruff or any lane fails (a lane whose pytest collects no tests, exit 5,
# fails too); every selected lane runs even after a failure, and a summary ends the output.
set -uo pipefail
cd "$(dirname "$0")/.."

lanes=${MG_LANES:-1 2}
while [[ $# -gt 0 ]]; do
  case $1 in
    --lane) lanes=${2:?--lane needs 1, 2 or 1,2}; shift 2 ;;
    --lane=*) lanes=${1#--lane=}; shift ;;
    *) break ;;
  esac
done
lanes=${lanes//,/ }
for lane in $lanes; do
  if [[ $lane != 1 && $lane != 2 ]]; then
    echo "tests/run.sh: unknown lane '$lane' (lanes: 1 = Python 3.11 + megatron-core 0.16.1, 2 = Python 3.12 + megatron-core 0.19.2)" >&2
    exit 2
  fi
done

lane_venv() {  # prints the lane's venv, creating it when needed
  case $1 in
    1) bash launch/setup_env.sh >&2 && echo "$PWD/.venv" ;;
    2) bash launch/setup_lane2_env.sh ;;
  esac
}

failed=0
summary=()
linted=0
for lane in $lanes; do
  started=$SECONDS
  if ! venv=$(lane_venv "$lane"); then
    echo "== lane $lane: setting up its environment failed" >&2
    summary+=("lane $lane: environment setup FAILED")
    failed=1
    continue
  fi
  if [[ ${MG_LINT:-1} != 0 && $linted == 0 ]]; then
    linted=1
    echo "== ruff $("$venv/bin/ruff" --version | cut -d' ' -f2): ruff check ."
    if "$venv/bin/ruff" check --output-format concise .; then
      summary+=("ruff: passed")
    else
      summary+=("ruff: FAILED")
      failed=1
    fi
  fi
  versions=$("$venv/bin/python" - <<'PY'
import platform
from importlib.metadata import version
print(f"Python {platform.python_version()}, torch {version('torch')}, megatron-core {version('megatron-core')}")
PY
)
  echo "== lane $lane: $versions ($venv)"
  PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" "$venv/bin/python" -m pytest "$@"
  rc=$?
  took="$(((SECONDS - started) / 60))m$(((SECONDS - started) % 60))s"
  case $rc in
    0) summary+=("lane $lane ($versions): passed in $took") ;;
    5) summary+=("lane $lane ($versions): FAILED, no tests were collected (pytest exit 5)"); failed=1 ;;
    *) summary+=("lane $lane ($versions): FAILED (pytest exit $rc) after $took"); failed=1 ;;
  esac
done

echo "== summary"
printf '  %s\n' "${summary[@]}"
exit $failed
