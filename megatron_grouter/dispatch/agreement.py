"""Verify mode: every EP rank must hold the same dispatch plan, checked across the EP group.

Each layer's verify check compares a rank's own row of the plan with the routing its router
produced; that cannot see a rank holding a wrong copy of a *peer's* row (its all-to-all would
then expect other split sizes than the peer sends, and tokens land at the wrong expert). So once
per micro-batch every rank all-gathers a checksum of each row of its plan; row p as EP rank p
holds it is the reference (its own routing). Only when some copy differs do the ranks gather the
whole tables, to name the rank, the row and the expert slot that differ. Debug mode: one
collective and one host copy per micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_grouter.dispatch.plan import DispatchPlanMismatch
from megatron_grouter.dispatch.plan import DispatchPlan

all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def row_checksums(tokens_per_expert_RE: torch.Tensor) -> torch.Tensor:
    """[EP] int64: Σ_e counts[p, e]·w_e with fixed pseudo-random 31-bit weights (moving any token
    between experts changes the sum)."""
    num_experts = tokens_per_expert_RE.shape[1]
    weights_E = torch.randint(1, 2**31 - 1, (num_experts,), generator=torch.Generator().manual_seed(20240),
                              dtype=torch.int64)
    return (tokens_per_expert_RE.long() * weights_E).sum(1)


def _gather(values: torch.Tensor, group, device: torch.device) -> torch.Tensor:
    size = group.size()
    local = values.reshape(-1).to(device)
    gathered = local.new_empty(size * local.numel())
    all_gather_single(gathered, local, group=group)
    return gathered.view(size, *values.shape).cpu()


def check_plans_agree(plan: DispatchPlan, group, device: torch.device = torch.device("cpu")) -> None:
    """Raise DispatchPlanMismatch (on every rank) unless all EP ranks hold the same plan."""
    if group is None or group.size() == 1:
        return
    sums_HP = _gather(row_checksums(plan.tokens_per_expert_RE), group, device)  # holder h, row p
    reference_P = sums_HP.diagonal()
    if torch.equal(sums_HP, reference_P.expand_as(sums_HP)):
        return
    tables_HPE = _gather(plan.tokens_per_expert_RE.long(), group, device)
    for holder, row in (sums_HP != reference_P).nonzero().tolist():
        held_E, own_E = tables_HPE[holder, row], tables_HPE[row, row]
        expert = int((held_E != own_E).nonzero()[0])  # the checksums differ, so the rows do
        raise DispatchPlanMismatch(
            f"dispatch plans disagree: EP rank {holder} plans {int(held_E[expert])} tokens from EP rank {row} "
            f"to expert slot {expert}, EP rank {row} itself {int(own_E[expert])}; the ranks would exchange "
            "mismatched split sizes")
