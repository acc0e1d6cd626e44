#!/usr/bin/env bash
# The main job on any machine (no GPU needed): the paper's experiment at toy scale, end to end, on
# the built-in corpus (this machine's Python standard library, BPE-tokenised once):
#   source MoE → distilled Grouter → fold → tune → predispatch → 8 target trainings (aux loss,
#   z-loss, aux-loss-free, hash, ProbMoE, Grouter raw / tuned / hybrid) → report.md with plots.
# = mg-reproduce experiment=quick. Every stage is cached by fingerprint: a rerun skips finished
# work, a killed run resumes. Extra arguments are Hydra overrides of the experiment, e.g.
#   bash launch/quickstart.sh experiment=standard         (the headline numbers, ≤ 90 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
.venv/bin/python -m megatron_grouter.reproduce experiment=quick "$@"
