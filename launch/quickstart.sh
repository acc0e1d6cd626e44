#!/usr/bin/env bash
# The main job on its built-in defaults, on any machine (no GPU needed): the Grouter pipeline at
# tiny scale on the built-in corpus (this machine's Python standard library, BPE-tokenised once):
#   1. pretrain a source MoE (tiny_cpu, 16 experts top-2, learned aux-loss router)
#   2. distil its first MoE layer's router into a Grouter
#   3. pretrain a new tiny_cpu MoE with that Grouter, frozen, routing every MoE layer
# printing the validation loss as it falls. Every step resumes/skips when rerun.
# Extra arguments are Hydra overrides for the final training (step 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=.venv/bin/python
OUT=${QUICKSTART_OUT:-outputs/quickstart}
STEPS=${QUICKSTART_STEPS:-200}
DISTILL_STEPS=${QUICKSTART_DISTILL_STEPS:-300}

echo "== 1/3 source MoE: tiny_cpu with the aux-loss router ($STEPS steps)"
$PY -m megatron_grouter.train train.steps="$STEPS" train.out_dir="$OUT/source"

echo "== 2/3 distil the source's first-MoE-layer router into a Grouter ($DISTILL_STEPS steps)"
$PY -m megatron_grouter.offline.distill source.kind=megatron source.path="$OUT/source" \
  data.prefix=data/stdlib/stdlib_text_document data.tokenizer=data/stdlib/tokenizer \
  grouter.hidden_size=128 grouter.num_layers=2 grouter.num_heads=4 grouter.window=128 \
  train.steps="$DISTILL_STEPS" train.batch_size=16 train.lr=3e-3 train.min_lr=3e-4 train.warmup_steps=30 \
  train.eval_interval=100 train.log_interval=50 out_dir="$OUT/distill"

echo "== 3/3 target MoE: tiny_cpu routed by the frozen Grouter ($STEPS steps)"
$PY -m megatron_grouter.train router=grouter_fixed router.grouter.path="$OUT/distill/grouter" \
  router.grouter.source=online train.steps="$STEPS" train.out_dir="$OUT/target-grouter_fixed" "$@"

echo "== done: source run $OUT/source, Grouter $OUT/distill/grouter, Grouter-routed run $OUT/target-grouter_fixed"
echo "   (for a routing cache instead of online routing: mg-predispatch, then router.grouter.source=cached; see README)"
