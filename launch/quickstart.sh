#!/usr/bin/env bash
# The main job on its built-in defaults, on any machine (no GPU needed): preprocess the Python
# standard library into a BPE-tokenised megatron dataset, then pretrain tiny_cpu (a 16-expert
# MoE GPT) and print the validation loss as it falls. Extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m megatron_grouter.train "$@"
