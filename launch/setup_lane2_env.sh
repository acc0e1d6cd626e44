#!/usr/bin/env bash
# Test lane 2's virtual environment: Python 3.12 + megatron-core 0.19.2 + torch 2.13.0 from the
# package index (the CUDA build; it runs on CPU too), with megatron-grouter installed editable.
#
# Prints the environment's directory on stdout (everything else goes to stderr). It lives outside
# the clone, in ${MG_VENV_CACHE:-${XDG_CACHE_HOME:-~/.cache}/megatron-grouter/venvs}/lane2-<key>,
# where <key> hashes what it installs: the interpreter's version, the clone's path (the editable
# install points at it), the pins below, setup.py, pyproject.toml and this script. A rerun with
# the same key reuses it without calling pip. A new one is built in a fresh `.build-*` directory
# and published by renaming a symlink onto lane2-<key> once the install has finished and been
# checked, so an install that was killed is never reused (the next build removes what it left).
# Builds are serialised with a lock file. Once a new venv is published, the ones this clone had
# under other keys (an older setup.py or pins) are removed.
#
# setup.py asks for ranges; the pins choose the lane's versions: they are installed first, then the
# project editable with its `test` extra under a constraints file holding the pins (a setup.py
# that excluded a pinned version fails here, with pip's resolver message).
set -euo pipefail
self=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$self")/.."
repo=$(pwd)

PINS=(torch==2.13.0 megatron-core==0.19.2 ruff==0.17.6)

log() { echo "[lane 2 setup] $*" >&2; }

PYTHON=${MG_LANE2_PYTHON:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
if [[ ! -x "$PYTHON" ]]; then
  PYTHON=$(command -v python3.12 || true)
fi
if [[ -z "$PYTHON" ]]; then
  log "no Python 3.12: install it (e.g. pyenv install 3.12.1) or set MG_LANE2_PYTHON"
  exit 1
fi
version=$("$PYTHON" -c 'import sys; print(sys.version.split()[0])')
if [[ "$version" != 3.12.* ]]; then
  log "$PYTHON is Python $version, lane 2 needs 3.12"
  exit 1
fi

# The clone's path is part of the key: the editable install points at it.
key=$({ echo "python $version"; echo "$repo"; printf '%s\n' "${PINS[@]}"; cat setup.py "$self"; cat pyproject.toml 2>/dev/null || true; } | sha256sum | cut -c1-16)
cache=${MG_VENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megatron-grouter/venvs}
venv=$cache/lane2-$key
ready() { [[ -x "$1/bin/python" ]]; }

if ready "$venv"; then
  echo "$venv"
  exit 0
fi
exec 3>&1 1>&2  # from here on only the final path goes to stdout (pip's output goes to stderr)
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if ready "$venv"; then  # built by another run while this one waited for the lock
  echo "$venv" >&3
  exit 0
fi
# Under the lock no other build is running: earlier builds that never got published are leftovers.
for dir in "$cache"/.build-*; do
  [[ -d "$dir" ]] || continue
  published=0
  for link in "$cache"/lane2-*; do
    [[ -L "$link" && "$(readlink "$link")" == "$(basename "$dir")" ]] && published=1
  done
  if [[ $published == 0 ]]; then
    log "removing an unfinished build: $dir"
    rm -rf "$dir"
  fi
done

build=$(mktemp -d "$cache/.build-lane2-$key-XXXXXX")
log "creating $venv with Python $version, ${PINS[*]} (first run only, a few minutes)"
"$PYTHON" -m venv "$build"
pip=("$build/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip
constraints=$build/.mg-constraints.txt
printf '%s\n' "${PINS[@]}" > "$constraints"
"${pip[@]}" install "${PINS[@]}"
"${pip[@]}" install -c "$constraints" -e ".[test]"
"$build/bin/python" - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    if version(name) != wanted:
        sys.exit(f"[lane 2 setup] {name} is {version(name)}, the lane pins {wanted}")
import megatron.core, megatron_grouter, torch  # noqa: E401,F401  the environment imports
EOF
echo "$repo" > "$build/.mg-repo"
ln -sfn "$(basename "$build")" "$cache/.link-$$"
mv -Tf "$cache/.link-$$" "$venv"
# Earlier lane-2 venvs of this clone (another setup.py or pins) are superseded: remove them.
for link in "$cache"/lane2-*; do
  if [[ -L "$link" && "$link" != "$venv" && "$(cat "$link/.mg-repo" 2>/dev/null)" == "$repo" ]]; then
    log "removing the superseded $link"
    old=$cache/$(readlink "$link")
    rm -f "$link"
    rm -rf "$old"
  fi
done
log "done: $venv"
echo "$venv" >&3
