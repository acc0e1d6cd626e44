#!/usr/bin/env bash
# Launch mg-train with torchrun, on one node or many.
#
#   launch/torchrun.sh [hydra overrides...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: GPUs on this node, or 2 on CPU)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank (default 0; ignored with c10d rendezvous)
#   MASTER_ADDR     rendezvous host: required when NNODES > 1 (a host every node reaches, e.g. the
#                   first node's name); one node uses a local standalone rendezvous
#   MASTER_PORT     rendezvous port (default 29500)
#   RDZV_ID         rendezvous id shared by all nodes of a job (default: mg-$USER)
#   MAX_RESTARTS    torchrun --max-restarts (default 0); restarts resume from the latest checkpoint
#   MG_DRY_RUN=1    print the torchrun command line instead of running it
# Defaults kept when already set: CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron's TP/SP communication
# overlap), TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a failed collective ends the rank instead of
# hanging), OMP_NUM_THREADS=1.
# Example: 2 CPU processes with expert parallelism 2:
#   NPROC_PER_NODE=2 launch/torchrun.sh parallel=ep2
set -euo pipefail

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU' || true)
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 2 ))}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}

if [[ ! "$NNODES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES=$NNODES is not a positive whole number of nodes; set NNODES=1 or more" >&2
  exit 2
fi
if [[ "$NNODES" == "1" ]]; then
  rendezvous=(--standalone)
else
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NNODES=$NNODES needs MASTER_ADDR, the rendezvous host every node can reach (e.g." \
         "the first node's hostname); set it to the same value on every node" >&2
    exit 2
  fi
  rendezvous=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
              --rdzv-id "${RDZV_ID:-mg-${USER:-job}}")
fi

# CPU processes share the cores: one intra-op thread each unless the user says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# Without a GPU, a GPU run (train.device=cuda) is refused here in one line, before any rank starts.
if (( gpus == 0 )) && [[ -z "${MG_DRY_RUN:-}" ]]; then
  python3 -m megatron_grouter.training.device_check "$@" || exit 2
fi

command=(torchrun --nproc-per-node "$NPROC_PER_NODE" "${rendezvous[@]}" --max-restarts "$MAX_RESTARTS"
         -m megatron_grouter.train train.resume=auto "$@")
if [[ -n "${MG_DRY_RUN:-}" ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
exec "${command[@]}"
