"""Global gradient norm and clipping over megatron's `main_grad` buffers.

Dense gradients are identical on every data-parallel rank after the DDP all-reduce, so they are
counted once (summed over the tensor-parallel group, skipping TP duplicates). Expert gradients
differ across expert-parallel ranks and are summed over that group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from megatron_grouter.runtime.distributed import all_reduce_host


def is_expert_parameter(param: torch.nn.Parameter) -> bool:
    return not getattr(param, "allreduce", True)


def global_grad_norm(params: list[torch.nn.Parameter]) -> float:
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for param in params:
        grad = param.main_grad
        square = grad.double().pow(2).sum().cpu()
        if is_expert_parameter(param):
            expert_sq += square
        elif param_is_not_tensor_parallel_duplicate(param):
            dense_sq += square
    if dist.is_initialized():
        dense_sq = all_reduce_host(dense_sq, group=parallel_state.get_tensor_model_parallel_group())
        expert_sq = all_reduce_host(expert_sq,
                                    group=parallel_state.get_expert_tensor_and_model_parallel_group())
    return math.sqrt(float(dense_sq + expert_sq))


@torch.no_grad()
def clip_main_grads(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Scale all main grads so their global norm is at most `max_norm`; return the norm before."""
    norm = global_grad_norm(params)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for param in params:
            param.main_grad.mul_(scale)
    return norm
