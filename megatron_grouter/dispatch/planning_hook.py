"""Trainer hook: before each forward, the dispatch plan of this micro-batch.

Every EP rank must agree on the all-to-all split sizes of the micro-batch the EP group runs.
Two sources, both computed once per micro-batch and shared by all MoE layers:
- an offline book (mg-plan-ep, cached routing + a placement plan's static schedule): the plan is
  looked up by (step, micro-batch index) — no routing of peers, no collective, no host work
  beyond the index;
- otherwise the count exchange: this rank's counts from the routing hook's host routing, one
  all-gather over the EP group (also in evaluation, where no book applies).
Verify mode adds one cross-rank check per micro-batch (agreement.py) to the per-layer checks.
"""

from __future__ import annotations

import torch

from megatron_grouter.dispatch.agreement import check_plans_agree
from megatron_grouter.dispatch.context import DispatchContext
from megatron_grouter.dispatch.count_exchange import exchange_counts
from megatron_grouter.dispatch.plan import DispatchPlan, routed_expert_counts
from megatron_grouter.dispatch.plan_book import DispatchPlanBook


class PlannedDispatchHook:
    def __init__(self, routing_hook, context: DispatchContext, num_experts: int, ep_group,
                 device: torch.device, replica: int = 0, book: DispatchPlanBook | None = None,
                 slot_of_expert: torch.Tensor | None = None,
                 activation_threshold: float | None = None, scaling_factor: float = 1.0):
        self.routing_hook = routing_hook  # runs first: its host routing is this rank's batch
        self.context = context
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.device = device
        self.replica = replica  # dp_rank // EP: which EP group of the book this rank is in
        self.book = book
        self.slot_of_expert = None if slot_of_expert is None else slot_of_expert.cpu()
        self.activation_threshold = activation_threshold
        self.scaling_factor = scaling_factor

    def own_counts(self) -> torch.Tensor:
        """[E] token copies per expert slot of this rank's micro-batch, from the host routing."""
        routing = self.routing_hook.host_routing
        topk = routing.indices_SBK.shape[-1]
        return routed_expert_counts(routing.indices_SBK.reshape(-1, topk), self.num_experts,
                                    self.slot_of_expert, routing.weights_SBK.reshape(-1, topk),
                                    self.activation_threshold, self.scaling_factor)

    def plan_for(self, trainer, batch) -> DispatchPlan:
        if self.book is not None and trainer.training:
            return self.book.plan_at(trainer.step, self.replica, batch.micro_batch_index)
        return exchange_counts(self.own_counts(), self.ep_group, self.device)

    def before_forward(self, trainer, batch) -> None:
        plan = self.plan_for(trainer, batch)
        if self.context.verify:
            check_plans_agree(plan, self.ep_group, self.device)
        self.context.set(plan)

    def after_forward(self, trainer, batch) -> None:
        self.context.clear()

    def step_metrics(self, trainer) -> dict:
        return {}
