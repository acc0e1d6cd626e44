"""Per-layer MoE statistics for a training step: load, MaxVioGlobal, auxiliary losses.

Loads come from each router's LoadMeter (this rank's tokens) and are summed over the
data-parallel group, so they describe the whole global batch; under pipeline parallelism each
stage holds only its own layers, so per-layer rows are placed at their global MoE index and
summed over the pipeline group too. The same numbers are logged for
every router, learned or fixed: a fixed router has nothing to back-propagate, but its load is
still the truth about balance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_grouter.megatron_compat import aux_loss_values, clear_aux_losses


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = (max_i L_i − mean L) / mean L."""
    mean = load_E.float().mean()
    if mean <= 0:
        return 0.0
    return float((load_E.float().max() - mean) / mean)


def _pipeline_parallel() -> bool:
    return dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the pipeline stages (each holds its own layers) and the data-parallel ranks."""
    if dist.is_initialized():
        if _pipeline_parallel():
            dist.all_reduce(tensor, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
    return tensor


def _metric_device() -> torch.device:
    """Where reduced statistics live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _by_global_layer(rows: list[torch.Tensor], moe_layers: list, pattern: list[int],
                     width: int) -> torch.Tensor:
    """[all MoE layers of the model, width], this stage's rows in their places, zeros elsewhere."""
    from megatron_grouter.training.model import global_moe_index

    table = torch.zeros(sum(pattern), width, dtype=torch.float64, device=_metric_device())
    for layer, row in zip(moe_layers, rows):
        table[global_moe_index(layer, pattern)] = row.to(table.device, torch.float64)
    return table


def collect_layer_loads(moe_layers: list, pattern: list[int], num_experts: int) -> torch.Tensor:
    """[num_moe_layers, E] token counts of the step over the global batch; resets the meters.
    `pattern` (model.moe_layer_pattern) places each layer at its index in the whole model."""
    rows = [layer.router.load_meter.take() for layer in moe_layers]
    return _global_sum(_by_global_layer(rows, moe_layers, pattern, num_experts))


def _tracker_names() -> list[str]:
    """Tracked loss names of every stage (a stage without MoE layers tracks none)."""
    names = sorted(aux_loss_values())
    if not _pipeline_parallel():
        return names
    gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(gathered, names, group=parallel_state.get_pipeline_model_parallel_group())
    return sorted({name for stage_names in gathered for name in stage_names})


def collect_aux_losses(num_microbatches: int, num_layers: int | None = None) -> dict[str, float]:
    """Mean over layers of each tracked auxiliary loss (megatron's tracker, one slot per layer of
    the whole model: `num_layers`), over every pipeline stage, averaged over DP."""
    tracker = aux_loss_values()
    losses: dict[str, float] = {}
    data_parallel = parallel_state.get_data_parallel_world_size()
    names = _tracker_names()
    for name in names:
        entry = tracker.get(name)
        # megatron's tracker rows have one slot per layer of the whole model
        values = (entry.detach().clone().float() if entry is not None
                  else torch.zeros(num_layers, device=_metric_device()))
        values = _global_sum(values) / (data_parallel * num_microbatches)
        nonzero = values[values != 0]
        losses[name] = float(nonzero.mean()) if nonzero.numel() else 0.0
    clear_aux_losses()
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


def collect_routing_entropy(moe_layers: list, pattern: list[int]) -> dict[str, float]:
    """Mean per-token routing entropy of each layer whose router meters one (ProbMoE's subset
    entropy, the hybrid router's gate entropy), over DP ranks."""
    rows = [layer.router.load_meter.take_entropy().double() for layer in moe_layers]
    sums_L2 = _global_sum(_by_global_layer(rows, moe_layers, pattern, 2))
    if float(sums_L2[:, 1].sum()) == 0:
        return {}
    name = moe_layers[0].router.load_meter.entropy_metric if moe_layers else "subset_entropy"
    per_layer = (sums_L2[:, 0] / sums_L2[:, 1].clamp_min(1)).tolist()
    summary = {f"moe/{name}": sum(per_layer) / len(per_layer)}
    summary.update({f"moe/{name}_layer{index}": value for index, value in enumerate(per_layer)})
    return summary


def expert_biases(moe_layers: list) -> list[torch.Tensor]:
    """Copies of the aux-loss-free selection biases (empty for routers without one)."""
    return [layer.router.expert_bias.detach().clone() for layer in moe_layers
            if getattr(layer.router, "expert_bias", None) is not None]


def expert_bias_metrics(before: list[torch.Tensor], moe_layers: list) -> dict[str, float]:
    """How far megatron's bias update (in finalize_model_grads) moved the biases this step, and
    their size: an aux-loss-free baseline whose bias does not move does not balance."""
    after = expert_biases(moe_layers)
    if not after:
        return {}
    sums = torch.stack([
        torch.stack([(new - old).abs().sum() for old, new in zip(before, after)]).sum().double(),
        torch.stack([new.abs().sum() for new in after]).sum().double(),
        torch.tensor(float(sum(new.numel() for new in after)), dtype=torch.float64,
                     device=after[0].device)]).to(_metric_device())
    if _pipeline_parallel():
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    change, size, count = (float(value) for value in sums)
    return {"moe/expert_bias_change": change / count, "moe/expert_bias_abs": size / count}
