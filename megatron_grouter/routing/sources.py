"""Where preemptive routing comes from, per micro-batch, and the trainer hook that delivers it.

A routing source maps a micro-batch to `Routing` (top-k source-expert ids and gate weights for
every token). Sources: the frozen Grouter run online, the routing cache written offline, a
token-id hash table. `PreemptiveRoutingHook` fills the model's RoutingContext before each forward
and clears it after, so routing can never leak from one batch into the next.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megatron_grouter.routing.context import Routing, RoutingContext


class RoutingSource(Protocol):
    def routing_for(self, batch) -> Routing:
        """Routing for every token of `batch` (a training MicroBatch)."""


class HashTableSource:
    """Each token id always goes to the same k experts: table_VK[token] (the hash-layer baseline).

    Gate weights are uniform here; the hybrid router replaces them with its trainable gate.
    """

    def __init__(self, table_VK: torch.Tensor):
        self.table_VK = table_VK.long()

    def routing_for(self, batch) -> Routing:
        indices_BSK = self.table_VK[batch.tokens_BS.cpu()]
        weights_BSK = torch.full(indices_BSK.shape, 1.0 / indices_BSK.shape[-1])
        return Routing.from_batch_first(indices_BSK, weights_BSK)


class PreemptiveRoutingHook:
    """Fills the model's RoutingContext per micro-batch. `host_routing` keeps the same routing
    on the host for the hooks after it (dispatch planning, traffic metrics), so they neither
    route the batch again nor copy it back from the device. A run whose routing reads later
    tokens (a bidirectional Grouter, opted in) says so in every step record:
    `routing/sees_future_tokens: 1`."""

    def __init__(self, source: RoutingSource, context: RoutingContext, sees_future_tokens: bool = False):
        self.source = source
        self.context = context
        self.sees_future_tokens = sees_future_tokens
        self.host_routing: Routing | None = None

    def before_forward(self, trainer, batch) -> None:
        routing = self.source.routing_for(batch)
        self.host_routing = routing
        device = batch.tokens_BS.device
        self.context.set(Routing(routing.indices_SBK.to(device), routing.weights_SBK.to(device)))

    def after_forward(self, trainer, batch) -> None:
        self.context.clear()
        self.host_routing = None

    def step_metrics(self, trainer) -> dict:
        entropies = [layer.router.take_gate_entropy() for layer in trainer.moe_layers
                     if hasattr(layer.router, "take_gate_entropy")]
        metrics = {"moe/gate_entropy": sum(entropies) / len(entropies)} if entropies else {}
        if self.sees_future_tokens:
            metrics["routing/sees_future_tokens"] = 1
        return metrics


class OnlineGrouterSource:
    """The frozen Grouter, run on the document windows of each micro-batch (no grad)."""

    def __init__(self, online_routing):
        self.online_routing = online_routing

    def routing_for(self, batch) -> Routing:
        indices_BSK, weights_BSK = self.online_routing.route_positions(batch.token_positions_BS)
        return Routing.from_batch_first(indices_BSK, weights_BSK)


class CachedRoutingSource:
    """Rows of the routing cache for each token of the micro-batch."""

    def __init__(self, cache):
        self.cache = cache

    def routing_for(self, batch) -> Routing:
        positions_BS = batch.token_positions_BS.clip(min=0)  # padding: routed like position 0
        indices_BSK, weights_BSK = self.cache.rows(positions_BS)
        return Routing.from_batch_first(indices_BSK, weights_BSK)
