"""megatron-core's optimizer for our model chunks, and our LR schedule fed into it.

`get_megatron_optimizer` picks the implementation from the config: FP32Optimizer (fp32 params),
Float16OptimizerWithFloat16Params (bf16 params with fp32 main params and fp32 Adam moments), or
DistributedOptimizer (main params and Adam state sharded over the data-parallel group, dense and
expert parameters each over their own group). Dense and expert parameters get separate
optimizers chained together when EP > 1. Its `step()` clips by megatron's global norm, which
counts every TP/EP/PP shard exactly once, and returns that norm.

Without CUDA, Transformer Engine and apex, megatron-core falls back to torch's AdamW, and
runtime/cpu_compat.py answers the few places that assume CUDA.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_grouter.training.config import ParallelConfig, TrainConfig


def optimizer_config(train: TrainConfig, parallel: ParallelConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=1e-8,
        clip_grad=train.clip_grad,
        bf16=train.bf16,
        params_dtype=torch.bfloat16 if train.bf16 else torch.float32,
        use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
    )


def build_optimizer(model_chunks: list, train: TrainConfig, parallel: ParallelConfig):
    """megatron's optimizer over the DDP-wrapped chunks. Weight decay skips biases and 1-D
    parameters (norm weights, expert bias), as megatron does by default."""
    return get_megatron_optimizer(optimizer_config(train, parallel), model_chunks,
                                  use_gloo_process_groups=torch.cuda.is_available())


def apply_schedule(optimizer, lr: float, weight_decay: float) -> None:
    """Set this step's learning rate and weight decay on every parameter group (megatron's own
    scheduler does the same; ours is a pure function of the step, so resuming needs nothing)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def torch_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer` (dense and expert ones are chained when EP > 1)
    that hold a torch optimizer on this rank."""
    inner = optimizer.chained_optimizers if hasattr(optimizer, "chained_optimizers") else [optimizer]
    return [chained for chained in inner if chained.optimizer is not None]


def optimizer_state_bytes(optimizer) -> int:
    """Bytes this rank holds for the optimizer: Adam moments, and the fp32 main params when the
    model's are bf16 (with fp32 model params the main params are the model's own, or views)."""
    total = 0
    for chained in torch_optimizers(optimizer):
        torch_optimizer = chained.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                state = torch_optimizer.state.get(param, {})
                total += sum(value.numel() * value.element_size() for value in state.values()
                             if torch.is_tensor(value) and value.dim() > 0)
                if chained.config.bf16:
                    total += param.numel() * param.element_size()  # the fp32 main copy
    return total
