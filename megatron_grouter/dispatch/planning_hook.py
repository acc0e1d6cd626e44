"""Trainer hook: before each training forward, the dispatch plan of this micro-batch.

Every EP rank must agree on the all-to-all split sizes, so the plan needs the routing of the
micro-batch each EP peer runs at the same moment. Nothing has to be communicated for that: the
trainer's schedule says which samples any data-parallel rank trains on at a step, and the routing
source (routing cache, online Grouter, hash table) routes them on the host. Each rank therefore
builds the same [EP, E] table on its own.

Evaluation runs without a plan (the dispatchers count at run time): every rank takes that path
together because all of them evaluate at the same steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_grouter.dispatch.context import DispatchContext
from megatron_grouter.dispatch.plan import DispatchPlan, routed_expert_counts
from megatron_grouter.training.batches import collate


def expert_peer_dp_ranks(device: torch.device) -> list[int]:
    """The data-parallel rank of each member of this rank's EP group, in EP rank order."""
    group = parallel_state.get_expert_model_parallel_group()
    own = torch.tensor([parallel_state.get_data_parallel_rank()], device=device)
    if group.size() == 1:
        return [int(own)]
    gathered = [torch.zeros_like(own) for _ in range(group.size())]
    dist.all_gather(gathered, own, group=group)
    return [int(rank) for rank in gathered]


def micro_batch_index(rank_sample_ids: list[int], batch_sample_ids: list[int]) -> int:
    size = len(batch_sample_ids)
    for index in range(len(rank_sample_ids) // size):
        if rank_sample_ids[index * size:(index + 1) * size] == batch_sample_ids:
            return index
    raise RuntimeError(f"micro-batch with samples {batch_sample_ids[:4]}… is not in this rank's "
                       "schedule for the step; the planned dispatcher cannot find its EP peers' batches")


class PlannedDispatchHook:
    def __init__(self, routing_hook, context: DispatchContext, peer_dp_ranks: list[int], num_experts: int,
                 slot_of_expert: torch.Tensor | None = None,
                 activation_threshold: float | None = None, scaling_factor: float = 1.0):
        self.routing_hook = routing_hook  # runs first: its host routing is this rank's batch
        self.context = context
        self.peer_dp_ranks = peer_dp_ranks
        self.num_experts = num_experts
        self.slot_of_expert = None if slot_of_expert is None else slot_of_expert.cpu()
        self.activation_threshold = activation_threshold
        self.scaling_factor = scaling_factor

    def plan_for(self, trainer, batch) -> DispatchPlan:
        micro_batch_size = trainer.config.train.micro_batch_size
        own_ids = trainer.schedule.rank_sample_ids(trainer.step, trainer.dp_rank)
        index = micro_batch_index(own_ids, batch.sample_ids_B.tolist())
        counts = []
        for peer_dp_rank in self.peer_dp_ranks:
            if peer_dp_rank == trainer.dp_rank:
                routing = self.routing_hook.host_routing
            else:
                peer_ids = trainer.schedule.rank_sample_ids(trainer.step, peer_dp_rank)
                peer_batch = collate(trainer.train_dataset,
                                     peer_ids[index * micro_batch_size:(index + 1) * micro_batch_size])
                routing = self.routing_hook.source.routing_for(peer_batch)
            topk = routing.indices_SBK.shape[-1]
            counts.append(routed_expert_counts(
                routing.indices_SBK.reshape(-1, topk), self.num_experts, self.slot_of_expert,
                routing.weights_SBK.reshape(-1, topk), self.activation_threshold,
                self.scaling_factor))
        return DispatchPlan(torch.stack(counts))

    def before_forward(self, trainer, batch) -> None:
        if trainer.training:
            self.context.set(self.plan_for(trainer, batch))

    def after_forward(self, trainer, batch) -> None:
        self.context.clear()

    def step_metrics(self, trainer) -> dict:
        return {}
