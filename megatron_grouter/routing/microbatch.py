"""The routing of a micro-batch, computed once by one pure function.

A preemptive source (the frozen Grouter online, the routing cache, a hash table) gives every
token its top-k *source* expert ids and weights. `route_tokens` turns them into what the model
runs: the expert slot of every copy (expert placement may put source expert g in slot
slot_of_expert[g]), its gate weight (scaled, and zero where a dynamic activation threshold drops
the copy) and whether the copy is routed at all. `copies_per_slot` counts routed copies per slot:
the row of this rank in the all-to-all split sizes.

Everyone who needs routing calls these two functions and nothing else: the preemptive routers
(through the `MicroBatchRouting` the forward step hands them), the trainer's dispatch planner
(count exchange) and mg-plan-ep's dispatch plan book. So the split sizes a planned dispatcher
exchanges always describe the routing its router produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class RoutingRule:
    """How a source's top-k becomes a layer's routing; fixed for a run."""

    num_experts: int
    slot_of_expert: torch.Tensor | None = None  # [E] source expert -> model slot (a permutation)
    scaling_factor: float = 1.0
    activation_threshold: float | None = None  # keep the top copies whose weights sum to <= this
    # slot_of_expert copied to other devices (filled by _slot_table; not part of the rule's identity)
    slot_tables: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class RoutedTokens:
    """Routing of a set of tokens, any leading shape [..., k]."""

    slots: torch.Tensor  # int64 model expert slot of each copy
    weights: torch.Tensor  # float32 gate weight of each copy (0 where not routed)
    routed: torch.Tensor  # bool: the copy goes to its expert

    def to(self, device: torch.device, non_blocking: bool = False) -> "RoutedTokens":
        return RoutedTokens(*(tensor.to(device, non_blocking=non_blocking)
                              for tensor in (self.slots, self.weights, self.routed)))

    def pin_memory(self) -> "RoutedTokens":
        return RoutedTokens(*(tensor.pin_memory() for tensor in (self.slots, self.weights, self.routed)))


def _slot_table(rule: RoutingRule, device: torch.device) -> torch.Tensor:
    """The rule's slot permutation on `device`, copied there once per rule (not per micro-batch)."""
    if rule.slot_of_expert.device == device:
        return rule.slot_of_expert
    if device not in rule.slot_tables:
        rule.slot_tables[device] = rule.slot_of_expert.to(device)
    return rule.slot_tables[device]


def threshold_mask(weights_TK: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep the longest prefix of the descending weights whose cumulative sum stays ≤ threshold
    (always at least the top expert)."""
    sorted_TK, order_TK = weights_TK.sort(dim=-1, descending=True)
    keep_sorted_TK = sorted_TK.cumsum(dim=-1) <= threshold + 1e-6
    keep_sorted_TK[..., 0] = True
    return torch.zeros_like(keep_sorted_TK).scatter(-1, order_TK, keep_sorted_TK)


def route_tokens(indices: torch.Tensor, weights: torch.Tensor, rule: RoutingRule) -> RoutedTokens:
    """The routing of tokens whose source chose experts `indices` with `weights` ([..., k])."""
    slots = indices.long()
    if rule.slot_of_expert is not None:
        slots = _slot_table(rule, slots.device)[slots]
    weights = weights.float() * rule.scaling_factor
    if rule.activation_threshold is None:
        routed = torch.ones_like(slots, dtype=torch.bool)
    else:
        routed = threshold_mask(weights, rule.activation_threshold * rule.scaling_factor) & (weights > 0)
        weights = weights * routed
    return RoutedTokens(slots, weights, routed)


def copies_per_slot(routing: RoutedTokens, num_experts: int, groups: int = 1) -> torch.Tensor:
    """Routed copies per expert slot, [E] (or [groups, E] when the leading dimension of the
    routing is `groups` independent micro-batches)."""
    slots_GN = routing.slots.reshape(groups, -1)
    routed_GN = routing.routed.reshape(groups, -1)
    offsets_G1 = torch.arange(groups, device=slots_GN.device)[:, None] * num_experts
    # a scatter-add of the routed flags: no boolean indexing or bincount, which size their output
    # from the data (a device→host sync on the GPU)
    counts = torch.zeros(groups * num_experts, dtype=torch.int64, device=slots_GN.device)
    counts.scatter_add_(0, (slots_GN + offsets_G1).reshape(-1), routed_GN.reshape(-1).long())
    counts = counts.view(groups, num_experts)
    return counts[0] if groups == 1 else counts


@dataclass(frozen=True)
class MicroBatchRouting:
    """What a micro-batch carries to the MoE layers: its tokens' routing, sequence-first
    ([s, b, k], megatron's token order s·b + b), this rank's copies per slot on the host, and
    (with the planned dispatcher) the dispatch plan of the whole EP group."""

    tokens_SBK: RoutedTokens
    copies_E: torch.Tensor  # int64, where the routing was computed (host, or the online Grouter's device)
    plan: object | None = None  # dispatch.plan.DispatchPlan
    sees_future_tokens: bool = False

    def to(self, device: torch.device, non_blocking: bool = False) -> "MicroBatchRouting":
        return replace(self, tokens_SBK=self.tokens_SBK.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "MicroBatchRouting":
        """Host copy in page-locked memory, so `to(cuda, non_blocking=True)` does not block
        (routing computed on the device stays there)."""
        if self.tokens_SBK.slots.device.type != "cpu":
            return self
        return replace(self, tokens_SBK=self.tokens_SBK.pin_memory())

    def with_plan(self, plan) -> "MicroBatchRouting":
        return replace(self, plan=plan)


def route_micro_batch(indices_BSK: torch.Tensor, weights_BSK: torch.Tensor, rule: RoutingRule,
                      sees_future_tokens: bool = False) -> MicroBatchRouting:
    """A micro-batch's routing from its source's batch-first top-k (host or device: it stays there)."""
    indices_SBK = indices_BSK.transpose(0, 1).contiguous()
    weights_SBK = weights_BSK.transpose(0, 1).contiguous()
    tokens = route_tokens(indices_SBK, weights_SBK, rule)
    return MicroBatchRouting(tokens, copies_per_slot(tokens, rule.num_experts),
                             sees_future_tokens=sees_future_tokens)
