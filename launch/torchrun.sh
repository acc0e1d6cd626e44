#!/usr/bin/env bash
# Launch mg-train with torchrun, on one node or many.
#
#   launch/torchrun.sh [hydra overrides...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: GPUs on this node, or 2 on CPU)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank (default 0; ignored with c10d rendezvous)
#   MASTER_ADDR     rendezvous host (default 127.0.0.1)
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         rendezvous id shared by all nodes of a job (default: mg-$USER)
#   MAX_RESTARTS    torchrun --max-restarts (default 0); restarts resume from the latest checkpoint
# Example: 2 CPU processes with expert parallelism 2:
#   NPROC_PER_NODE=2 launch/torchrun.sh parallel=ep2
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L | wc -l)
  else
    NPROC_PER_NODE=2
  fi
fi
NNODES=${NNODES:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}

if [[ "$NNODES" == "1" ]]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
              --rdzv-id "${RDZV_ID:-mg-${USER:-job}}")
fi

# CPU processes share the cores: one intra-op thread each unless the user says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec torchrun --nproc-per-node "$NPROC_PER_NODE" "${rendezvous[@]}" \
  --max-restarts "$MAX_RESTARTS" -m megatron_grouter.train train.resume=auto "$@"
