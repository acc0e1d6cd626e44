#!/usr/bin/env bash
# Installs what the throwaway Slurm cluster tests need (tests/cluster/): Slurm's controller,
# node daemon and client commands, munge for authentication, iproute2 for network namespaces.
# Idempotent and quiet: does nothing when every tool is already there. Without root or apt-get it
# only warns (the cluster tests then skip with a reason); a failing apt-get fails with its log.
set -euo pipefail

needed_commands=(slurmctld slurmd sbatch munged ip)
packages=(slurmctld slurmd slurm-client munge iproute2)

missing=()
for command_name in "${needed_commands[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$command_name" >/dev/null 2>&1 || missing+=("$command_name")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_slurm: missing ${missing[*]}; need root and apt-get to install, cluster tests will skip" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt_log=$(mktemp)
trap 'rm -f "$apt_log"' EXIT
apt_quiet() {
  apt-get -y -qq "$@" >>"$apt_log" 2>&1
}
# The package lists are only fetched when apt has none (fresh container images ship without them).
if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
  apt_quiet update || { cat "$apt_log" >&2; exit 1; }
fi
if ! apt_quiet install --no-install-recommends "${packages[@]}"; then
  # Stale lists (a package moved): refresh once and retry.
  if ! { apt_quiet update && apt_quiet install --no-install-recommends "${packages[@]}"; }; then
    cat "$apt_log" >&2
    exit 1
  fi
fi
echo "install_slurm: installed ${packages[*]}"
