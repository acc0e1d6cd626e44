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

With sequence parallelism (TP > 1, expert tensor parallel size 1) each TP rank's MoE layers see
only its slice of the sequence and dispatch it as an EP rank of its own (megatron folds the TP
ranks into the EP/expert-DP grid), so a rank counts the copies of its own slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_grouter.dispatch.agreement import check_plans_agree
from megatron_grouter.dispatch.plan import DispatchPlan
from megatron_grouter.dispatch.plan_book import DispatchPlanBook
from megatron_grouter.routing.microbatch import RoutedTokens, copies_per_slot

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


def sequence_slice_copies(routing, shards: int, rank: int) -> torch.Tensor:
    """Copies per slot of sequence slice `rank` of `shards` of a micro-batch's routing ([s, b, k],
    the slice a sequence-parallel TP rank's MoE layers run)."""
    if shards == 1:
        return routing.copies_E
    tokens = routing.tokens_SBK
    chunk = tokens.slots.shape[0] // shards
    part = slice(rank * chunk, (rank + 1) * chunk)
    return copies_per_slot(RoutedTokens(tokens.slots[part], tokens.weights[part], tokens.routed[part]),
                           routing.copies_E.numel()).cpu()


class DispatchPlanner:
    def __init__(self, ep_group, device: torch.device, replica: int = 0,
                 book: DispatchPlanBook | None = None, verify: bool = False,
                 sequence_shards: int = 1, sequence_rank: int = 0):
        if book is not None and sequence_shards > 1:
            raise ValueError("a dispatch plan book plans whole micro-batches; sequence-parallel ranks count")
        self.ep_group = ep_group
        self.device = device
        self.replica = replica  # dp_rank // EP: which EP group of the book this rank is in
        self.book = book
        self.verify = verify
        self.sequence_shards = sequence_shards  # TP size under sequence parallelism, else 1
        self.sequence_rank = sequence_rank

    def plans(self, routings: list, step: int, training: bool) -> list[DispatchPlan]:
        """The plan of each micro-batch (in order) of this rank's step."""
        if self.book is not None and training:
            plans = [self.book.plan_at(step, self.replica, index) for index in range(len(routings))]
        else:
            counts_ME = torch.stack([sequence_slice_copies(routing, self.sequence_shards, self.sequence_rank)
                                     for routing in routings])
            plans = exchange_counts(counts_ME, self.ep_group, self.device)
        if self.verify:
            for plan in plans:
                check_plans_agree(plan, self.ep_group, self.device)
        return plans
