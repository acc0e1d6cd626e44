"""The dispatch plans of a step's micro-batches, attached to their routing before the schedule runs.

Every EP rank must agree on the all-to-all split sizes of the micro-batch the EP group runs.
Two sources, both for all of this rank's micro-batches of a step at once:
- an offline book (mg-plan-ep, cached routing + a placement plan's static schedule): plans are
  looked up by (step, micro-batch index) — no routing of peers, no collective, no host work
  beyond an index;
- otherwise the count exchange: each micro-batch's own copies per slot (`copies_E` of its
  routing, from routing.microbatch) stacked [M, E] and all-gathered over the EP group once per
  step (also in evaluation, where no book applies).
Verify mode adds one cross-rank agreement check per micro-batch (agreement.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_grouter.dispatch.agreement import check_plans_agree
from megatron_grouter.dispatch.plan import DispatchPlan
from megatron_grouter.dispatch.plan_book import DispatchPlanBook

all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def exchange_counts(counts_ME: torch.Tensor, group, device: torch.device) -> list[DispatchPlan]:
    """One [EP, E] plan per micro-batch from this rank's [M, E] counts: one all-gather (NCCL
    needs the counts on the device, gloo on the host)."""
    counts_ME = counts_ME.long()
    if group is None or group.size() == 1:
        return [DispatchPlan.trusted(row[None].clone()) for row in counts_ME.cpu()]
    local = counts_ME.to(device).reshape(-1)
    gathered = local.new_empty(group.size() * local.numel())
    all_gather_single(gathered, local, group=group)
    counts_RME = gathered.view(group.size(), *counts_ME.shape).cpu()
    return [DispatchPlan.trusted(counts_RME[:, index].contiguous()) for index in range(counts_ME.shape[0])]


class DispatchPlanner:
    def __init__(self, ep_group, device: torch.device, replica: int = 0,
                 book: DispatchPlanBook | None = None, verify: bool = False):
        self.ep_group = ep_group
        self.device = device
        self.replica = replica  # dp_rank // EP: which EP group of the book this rank is in
        self.book = book
        self.verify = verify

    def plans(self, routings: list, step: int, training: bool) -> list[DispatchPlan]:
        """The plan of each micro-batch (in order) of this rank's step."""
        if self.book is not None and training:
            plans = [self.book.plan_at(step, self.replica, index) for index in range(len(routings))]
        else:
            plans = exchange_counts(torch.stack([routing.copies_E for routing in routings]),
                                    self.ep_group, self.device)
        if self.verify:
            for plan in plans:
                check_plans_agree(plan, self.ep_group, self.device)
        return plans
