"""Per-layer MoE statistics for a training step: load, MaxVioGlobal, auxiliary losses.

Loads come from each router's LoadMeter (this rank's tokens) and are summed over the
data-parallel group, so they describe the whole global batch. The same numbers are logged for
every router, learned or fixed: a fixed router has nothing to back-propagate, but its load is
still the truth about balance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                     get_moe_layer_wise_logging_tracker)


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max_i L_i − mean L) / mean L."""
    mean = load_E.float().mean()
    if mean <= 0:
        return 0.0
    return float((load_E.float().max() - mean) / mean)


def _data_parallel_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


def collect_layer_loads(moe_layers: list) -> torch.Tensor:
    """[num_moe_layers, E] token counts of the step over the global batch; resets the meters."""
    loads_LE = torch.stack([layer.router.load_meter.take() for layer in moe_layers])
    return _data_parallel_sum(loads_LE)


def collect_aux_losses(num_microbatches: int) -> dict[str, float]:
    """Mean over layers of each tracked auxiliary loss (megatron's tracker), averaged over DP."""
    tracker = get_moe_layer_wise_logging_tracker()
    losses: dict[str, float] = {}
    data_parallel = parallel_state.get_data_parallel_world_size()
    for name, entry in tracker.items():
        values = entry["values"].detach().clone().float()
        values = _data_parallel_sum(values) / (data_parallel * num_microbatches)
        nonzero = values[values != 0]
        losses[name] = float(nonzero.mean()) if nonzero.numel() else 0.0
    clear_aux_losses_tracker()
    return losses


def summarise_loads(loads_LE: torch.Tensor, num_tokens: int) -> dict[str, float]:
    per_layer = [max_violation(load_E) for load_E in loads_LE]
    # MaxVioGlobal of a layer: over the whole global batch; the headline is the layer mean.
    active_L = loads_LE.sum(1) / max(1, num_tokens)
    summary = {"moe/max_vio": sum(per_layer) / max(1, len(per_layer)),
               "moe/active_experts": float(active_L.mean())}
    for index, value in enumerate(per_layer):
        summary[f"moe/max_vio_layer{index}"] = value
        summary[f"moe/active_experts_layer{index}"] = float(active_L[index])
    return summary


def collect_routing_entropy(moe_layers: list) -> dict[str, float]:
    """Mean per-token routing entropy of each layer whose router meters one, over DP ranks."""
    sums_L2 = _data_parallel_sum(torch.stack([layer.router.load_meter.take_entropy() for layer in moe_layers]))
    if float(sums_L2[:, 1].sum()) == 0:
        return {}
    per_layer = (sums_L2[:, 0] / sums_L2[:, 1].clamp_min(1)).tolist()
    summary = {"moe/subset_entropy": sum(per_layer) / len(per_layer)}
    summary.update({f"moe/subset_entropy_layer{index}": value for index, value in enumerate(per_layer)})
    return summary
