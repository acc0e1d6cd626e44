"""Gives every micro-batch of a step its routing before megatron's schedule runs.

For a preemptive router the routing of a micro-batch is data: the source's top-k for its tokens
(the frozen Grouter, the routing cache, a hash table), turned into expert slots, gate weights
and split sizes by the one routing function (`routing.microbatch.route_micro_batch`), plus, for
the planned dispatcher, the EP group's dispatch plan of that micro-batch (`dispatch.planner`).
It is attached to `MicroBatch.routing` on the host; the trainer moves the batch to the device
ahead of use (training/device_batches.py), possibly a step early, and has it observed (EP traffic
metrics) when the step runs it; the forward step only hands it to the layers.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch
from megatron_grouter.runtime.host_syncs import host_data


class RoutingObserver(Protocol):
    def observe(self, routings: list, training: bool) -> None:
        """Host routings of this rank's micro-batches of a step (or an evaluation batch)."""


class PreemptiveRouting:
    def __init__(self, source, rule: RoutingRule, device: torch.device, planner=None,
                 sees_future_tokens: bool = False, observers: list[RoutingObserver] | None = None):
        self.source = source
        self.rule = rule
        self.device = device
        self.planner = planner  # dispatch.planner.DispatchPlanner, for the planned dispatcher
        self.sees_future_tokens = sees_future_tokens
        self.observers = list(observers or [])

    @property
    def routes_on_host(self) -> bool:
        """True when routing a batch reads host data only (a cache, a hash table), false for a
        source that runs on the device (the online Grouter)."""
        return getattr(self.source, "on_host", False)

    def attach(self, batches: list, step: int, training: bool) -> None:
        """Set `batch.routing` (on the host) of every micro-batch of this rank's step, in order."""
        routings = [route_micro_batch(*self.source.topk_for(batch), self.rule, self.sees_future_tokens)
                    for batch in batches]
        if self.planner is not None:
            plans = self.planner.plans(routings, step, training)
            routings = [routing.with_plan(plan) for routing, plan in zip(routings, plans)]
        for batch, routing in zip(batches, routings):
            batch.routing = routing

    def observe(self, batches: list, training: bool) -> None:
        """Show the observers the host routing of the micro-batches a step (or evaluation) runs."""
        routings = [batch.routing if batch.host_routing is None else batch.host_routing for batch in batches]
        with host_data():
            for observer in self.observers:
                observer.observe(routings, training)

    def step_metrics(self, trainer) -> dict:
        return {"routing/sees_future_tokens": 1} if self.sees_future_tokens else {}
