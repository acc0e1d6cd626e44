"""Per-layer MoE statistics of a training step: load, MaxVioGlobal, auxiliary losses, routing
entropy, expert-bias movement.

Each function here has two halves. `*_sums` reads this rank's share of a step as device tensors
of sums (no host sync, no collective): loads from each router's LoadMeter, placed at the layer's
index in the whole model (a pipeline stage holds only its own layers), megatron's auxiliary-loss
tracker, the entropy meters, the expert biases. `training/step_statistics.py` sums those over all
ranks once per log window; the plain functions then turn the global sums into metrics. The same
numbers are logged for every router, learned or fixed: a fixed router has nothing to
back-propagate, but its load is still the truth about balance.
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


def metric_device() -> torch.device:
    """Where statistics are reduced: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _by_global_layer(rows: list[torch.Tensor], moe_layers: list, pattern: list[int],
                     width: int) -> torch.Tensor:
    """[all MoE layers of the model, width], this stage's rows in their places, zeros elsewhere."""
    from megatron_grouter.training.model import global_moe_index

    table = torch.zeros(sum(pattern), width, dtype=torch.float64, device=metric_device())
    for layer, row in zip(moe_layers, rows):
        table[global_moe_index(layer, pattern)] = row.to(table.device, torch.float64)
    return table


def layer_load_sums(moe_layers: list, pattern: list[int], num_experts: int) -> torch.Tensor:
    """[num_moe_layers, E] tokens this rank routed to each expert since the last call (resets
    the meters). `pattern` (model.moe_layer_pattern) places each layer at its model-wide index."""
    return _by_global_layer([layer.router.load_meter.take() for layer in moe_layers], moe_layers,
                            pattern, num_experts)


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


def tracked_aux_loss_names() -> list[str]:
    """The auxiliary losses megatron's tracker holds on any pipeline stage (a stage without MoE
    layers tracks none); one object gather over the stages, so a run asks once."""
    names = sorted(aux_loss_values())
    if not dist.is_initialized() or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return names
    gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(gathered, names, group=parallel_state.get_pipeline_model_parallel_group())
    return sorted({name for stage_names in gathered for name in stage_names})


def aux_loss_sums(names: list[str], num_layers: int) -> torch.Tensor:
    """[len(names), num_layers]: each tracked loss, per layer of the whole model, summed over this
    rank's micro-batches of the step; clears megatron's tracker."""
    tracker = aux_loss_values()
    rows = [tracker[name].detach().to(metric_device(), torch.float64).clone() if name in tracker
            else torch.zeros(num_layers, dtype=torch.float64, device=metric_device()) for name in names]
    clear_aux_losses()
    if not rows:
        return torch.zeros(0, num_layers, dtype=torch.float64, device=metric_device())
    return torch.stack(rows)


def summarise_aux_losses(names: list[str], sums_NL: torch.Tensor, data_parallel: int,
                         num_microbatches: int) -> dict[str, float]:
    """Mean over the layers that track it of each loss, per micro-batch, averaged over DP."""
    losses = {}
    for name, values in zip(names, sums_NL / (data_parallel * num_microbatches)):
        nonzero = values[values != 0]
        losses[f"moe/{name}"] = float(nonzero.mean()) if nonzero.numel() else 0.0
    return losses


def entropy_sums(moe_layers: list, pattern: list[int]) -> torch.Tensor:
    """[num_moe_layers, 2] (entropy sum, tokens) of each layer whose router meters one (ProbMoE's
    subset entropy, the hybrid router's gate entropy) since the last call; resets the meters."""
    return _by_global_layer([layer.router.load_meter.take_entropy() for layer in moe_layers],
                            moe_layers, pattern, 2)


def summarise_entropy(name: str, sums_L2: torch.Tensor) -> dict[str, float]:
    if float(sums_L2[:, 1].sum()) == 0:
        return {}
    per_layer = (sums_L2[:, 0] / sums_L2[:, 1].clamp_min(1)).tolist()
    summary = {f"moe/{name}": sum(per_layer) / len(per_layer)}
    summary.update({f"moe/{name}_layer{index}": value for index, value in enumerate(per_layer)})
    return summary


def drain_meters(moe_layers: list) -> None:
    """Forget what the routers counted (evaluation traffic is not training load)."""
    for layer in moe_layers:
        layer.router.load_meter.take()
        layer.router.load_meter.take_entropy()
    clear_aux_losses()


def expert_biases(moe_layers: list) -> list[torch.Tensor]:
    """Copies of the aux-loss-free selection biases (empty for routers without one)."""
    return [layer.router.expert_bias.detach().clone() for layer in moe_layers
            if getattr(layer.router, "expert_bias", None) is not None]


def expert_bias_sums(before: list[torch.Tensor], moe_layers: list) -> torch.Tensor:
    """[3]: how far megatron's bias update (in finalize_model_grads) moved this rank's biases this
    step, their size, and their count (zeros without biases). Every rank holding a copy adds
    its copy; the ratios do not change."""
    after = expert_biases(moe_layers)
    if not after:
        return torch.zeros(3, dtype=torch.float64, device=metric_device())
    return torch.stack([
        torch.stack([(new - old).abs().sum() for old, new in zip(before, after)]).sum().double(),
        torch.stack([new.abs().sum() for new in after]).sum().double(),
        # a fill, not a host→device copy of a Python number
        after[0].new_full((), float(sum(new.numel() for new in after)), dtype=torch.float64),
    ]).to(metric_device())


def summarise_expert_bias(sums_3: torch.Tensor) -> dict[str, float]:
    """An aux-loss-free baseline whose bias does not move does not balance: log both."""
    change, size, count = (float(value) for value in sums_3)
    if count == 0:
        return {}
    return {"moe/expert_bias_change": change / count, "moe/expert_bias_abs": size / count}
