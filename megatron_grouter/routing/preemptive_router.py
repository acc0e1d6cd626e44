"""Preemptive routers for megatron-core's MoELayer: the experts are chosen before the model runs.

The experts (and, for `fixed`, the gate weights) of every token come from the RoutingContext,
filled per micro-batch by a routing source (the frozen Grouter online, the routing cache, or a
hash table). One source serves all MoE layers.

- `FixedRouter`: no trainable parameters and no auxiliary loss; gate weights are the source's
  (optionally rescaled, optionally cut by a dynamic activation threshold).
- `HybridRouter`: the source picks the experts; the layer's own trainable gate weighs them
  (softmax over the chosen experts' logits). With a hash-table source this is the balanced
  hash-layer baseline.
Both map source expert ids to model expert slots (`slot_of_expert`, a permutation): expert
placement may put source expert g in slot π⁻¹(g) without touching the source or the checkpoint.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import Router, TopKRouter

from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.metered_router import LoadMeter


def identity_permutation(num_experts: int) -> torch.Tensor:
    return torch.arange(num_experts, dtype=torch.long)


def threshold_mask(weights_TK: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the longest prefix of the descending weights whose cumulative sum stays ≤ threshold
    (always at least the top expert)."""
    sorted_TK, order_TK = weights_TK.sort(dim=1, descending=True)
    keep_sorted_TK = sorted_TK.cumsum(dim=1) <= threshold + 1e-6
    keep_sorted_TK[:, 0] = True
    return torch.zeros_like(keep_sorted_TK).scatter(1, order_TK, keep_sorted_TK)


def dense_routing(slots_TK: torch.Tensor, weights_TK: torch.Tensor,
                  num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] slots and weights → megatron's [T, E] probs and boolean routing map."""
    probs_TE = torch.zeros(slots_TK.shape[0], num_experts, dtype=weights_TK.dtype,
                           device=weights_TK.device).scatter(1, slots_TK, weights_TK)
    routing_map_TE = torch.zeros(slots_TK.shape[0], num_experts, dtype=torch.bool,
                                 device=slots_TK.device).scatter(1, slots_TK, True)
    return probs_TE, routing_map_TE


class FixedRouter(Router):
    def __init__(self, config, pg_collection=None, *, context: RoutingContext,
                 slot_of_expert: torch.Tensor | None = None, scaling_factor: float = 1.0,
                 activation_threshold: float | None = None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.weight = None  # nothing to learn: the gate is the frozen source
        self.bias = None
        self.context = context
        self.scaling_factor = scaling_factor
        self.activation_threshold = activation_threshold
        slots = identity_permutation(self.num_experts) if slot_of_expert is None else slot_of_expert
        self.register_buffer("slot_of_expert", slots.long().clone(), persistent=False)
        self.load_meter = LoadMeter(self.num_experts)

    def routing(self, indices_TK: torch.Tensor, weights_TK: torch.Tensor):
        slots_TK = self.slot_of_expert.to(indices_TK.device)[indices_TK.long()]
        weights_TK = weights_TK.float() * self.scaling_factor
        if self.activation_threshold is not None:
            keep_TK = threshold_mask(weights_TK, self.activation_threshold * self.scaling_factor)
            weights_TK = weights_TK * keep_TK
            # Dropped experts get weight 0 and leave the routing map.
            probs_TE, routing_map_TE = dense_routing(slots_TK, weights_TK, self.num_experts)
            routing_map_TE &= probs_TE > 0
        else:
            probs_TE, routing_map_TE = dense_routing(slots_TK, weights_TK, self.num_experts)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        num_tokens = input.shape[0] * input.shape[1] if input.dim() == 3 else input.shape[0]
        indices_TK, weights_TK = self.context.local(num_tokens)
        return self.routing(indices_TK.to(input.device), weights_TK.to(input.device))


class HybridRouter(TopKRouter):
    """Experts from the source; weights from this layer's trainable gate."""

    def __init__(self, config, pg_collection=None, *, context: RoutingContext,
                 slot_of_expert: torch.Tensor | None = None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.context = context
        slots = identity_permutation(self.num_experts) if slot_of_expert is None else slot_of_expert
        self.register_buffer("slot_of_expert", slots.long().clone(), persistent=False)
        self.load_meter = LoadMeter(self.num_experts)
        self.register_buffer("entropy_sum", torch.zeros(()), persistent=False)
        self.register_buffer("entropy_tokens", torch.zeros(()), persistent=False)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits_TE = logits.view(-1, self.num_experts)
        indices_TK, _ = self.context.local(logits_TE.shape[0])
        slots_TK = self.slot_of_expert.to(logits_TE.device)[indices_TK.to(logits_TE.device).long()]
        gates_TK = torch.softmax(logits_TE.gather(1, slots_TK).float(), dim=-1)
        if self.config.moe_router_topk_scaling_factor:
            gates_TK = gates_TK * self.config.moe_router_topk_scaling_factor
        with torch.no_grad():
            self.entropy_sum += -(gates_TK * gates_TK.clamp_min(1e-12).log()).sum()
            self.entropy_tokens += gates_TK.shape[0]
        probs_TE, routing_map_TE = dense_routing(slots_TK, gates_TK.to(logits_TE.dtype), self.num_experts)
        self.load_meter.record(routing_map_TE)
        return probs_TE, routing_map_TE

    def take_gate_entropy(self) -> float:
        value = float(self.entropy_sum / self.entropy_tokens.clamp_min(1))
        self.entropy_sum.zero_()
        self.entropy_tokens.zero_()
        return value
