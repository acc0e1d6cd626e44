"""AdamW over megatron's fp32 `main_grad` buffers (the CPU path; also valid on one GPU).

megatron's DistributedDataParallel accumulates every parameter's gradient into `main_grad` and
all-reduces it over the right data-parallel group (dense vs expert parameters). The step clips
by the global norm, hands `main_grad` to torch's AdamW and updates the weights.
"""

from __future__ import annotations

import torch

from megatron_grouter.training.config import TrainConfig
from megatron_grouter.training.grad_norm import clip_main_grads


def build_adamw(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=train.lr,
                             betas=(train.adam_beta1, train.adam_beta2), eps=1e-8, foreach=False)


def trainable_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def optimizer_step(optimizer: torch.optim.Optimizer, lr: float, clip_grad: float) -> float:
    """Clip, step, and return the gradient norm before clipping."""
    params = trainable_params(optimizer)
    grad_norm = clip_main_grads(params, clip_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for param in params:
        param.grad = param.main_grad.to(param.dtype)
    optimizer.step()
    for param in params:
        param.grad = None
    return grad_norm
