"""Preemptive routers for megatron-core's MoELayer: the experts are chosen before the model runs.

Each micro-batch carries its routing (`routing.microbatch.MicroBatchRouting`: expert slots,
gate weights, which copies are routed), computed once from a routing source (the frozen Grouter
online, the routing cache, or a hash table) by `route_micro_batch`; the forward step hands it to
the layers through the RoutingContext. One routing serves all MoE layers.

- `FixedRouter`: no trainable parameters and no auxiliary loss; gate weights are the routing's.
- `HybridRouter`: the routing picks the experts; the layer's own trainable gate weighs them
  (softmax over the chosen experts' logits). With a hash-table source this is the balanced
  hash-layer baseline.
Both take extra keyword arguments megatron passes to routers (e.g. `is_mtp_layer`, 0.17+) on to
megatron's Router.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import Router, TopKRouter

from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.metered_router import LoadMeter


def dense_routing(slots_TK: torch.Tensor, weights_TK: torch.Tensor, routed_TK: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] slots, weights and routed flags → megatron's [T, E] probs and boolean routing map."""
    probs_TE = torch.zeros(slots_TK.shape[0], num_experts, dtype=weights_TK.dtype,
                           device=weights_TK.device).scatter(1, slots_TK, weights_TK)
    routing_map_TE = torch.zeros(slots_TK.shape[0], num_experts, dtype=torch.bool,
                                 device=slots_TK.device).scatter(1, slots_TK, routed_TK)
    return probs_TE, routing_map_TE


def _num_tokens(hidden: torch.Tensor) -> int:
    return hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]


class FixedRouter(Router):
    def __init__(self, config, pg_collection=None, *, context: RoutingContext, **megatron_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.weight = None  # nothing to learn: the gate is the frozen source
        self.bias = None
        self.context = context
        self.load_meter = LoadMeter(self.num_experts)

    def routing(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        probs_TE, routing_map_TE = dense_routing(tokens.slots, tokens.weights, tokens.routed,
                                                 self.num_experts)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        return self.routing(self.context.local(_num_tokens(input)).to(input.device))


class HybridRouter(TopKRouter):
    """Experts from the routing; weights from this layer's trainable gate. The mean entropy of
    its gates is metered like ProbMoE's subset entropy (LoadMeter), so evaluation never mixes in."""

    def __init__(self, config, pg_collection=None, *, context: RoutingContext, **megatron_kwargs):
        super().__init__(config=config, pg_collection=pg_collection, **megatron_kwargs)
        self.context = context
        self.load_meter = LoadMeter(self.num_experts, entropy_metric="gate_entropy")

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits_TE = logits.view(-1, self.num_experts)
        tokens = self.context.local(logits_TE.shape[0]).to(logits_TE.device)
        gates_TK = torch.softmax(logits_TE.gather(1, tokens.slots).float(), dim=-1)
        if self.config.moe_router_topk_scaling_factor:
            gates_TK = gates_TK * self.config.moe_router_topk_scaling_factor
        self.load_meter.record_entropy(-(gates_TK * gates_TK.clamp_min(1e-12).log()).sum(-1))
        probs_TE, routing_map_TE = dense_routing(tokens.slots, gates_TK.to(logits_TE.dtype),
                                                 tokens.routed, self.num_experts)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE
