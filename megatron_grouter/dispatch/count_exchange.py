"""The dispatch plan of a micro-batch from one all-gather of the E counts of every EP rank.

Where no offline plan exists (online routing, an unplanned schedule), each rank counts its own
micro-batch's token copies per expert slot on the host (from the routing hook's host routing)
and the EP group all-gathers them once: one collective and one host copy per micro-batch, shared
by all MoE layers (they route alike), instead of routing every peer's batch on every rank or an
all-gather in every layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_grouter.dispatch.plan import DispatchPlan

all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def exchange_counts(counts_E: torch.Tensor, group, device: torch.device) -> DispatchPlan:
    """[EP, E] plan from this rank's [E] counts (NCCL needs them on the device, gloo on the host)."""
    counts_E = counts_E.long()
    if group is None or group.size() == 1:
        return DispatchPlan.trusted(counts_E.cpu()[None])
    local_E = counts_E.to(device)
    gathered = local_E.new_empty(group.size() * local_E.numel())
    all_gather_single(gathered, local_E, group=group)
    return DispatchPlan.trusted(gathered.view(group.size(), -1).cpu())
