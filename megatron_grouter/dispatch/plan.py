"""The dispatch plan of one micro-batch: how many token copies each EP rank sends to each expert.

Preemptive routing is known on the host before the forward, for every EP rank, and every MoE
layer of the model routes the same way (one shared Grouter). So one [EP, E] table of counts,
built once per micro-batch, gives every layer its all-to-all split sizes and the number of tokens
each local expert receives — no count collective and no device→host sync inside the layers.

Experts are laid out as megatron does: EP rank r holds expert slots [r·L, (r+1)·L), L = E/EP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from megatron_grouter.runtime.host_syncs import host_data



class DispatchPlanMismatch(RuntimeError):
    """A plan out of step with the routing (verify mode), or ranks holding different plans."""


@dataclass(frozen=True)
class RankSplits:
    """What one EP rank needs from the plan; plain Python ints so collectives take them as they are."""

    input_splits: list[int]  # token copies this rank sends to each EP rank
    output_splits: list[int]  # token copies this rank receives from each EP rank
    received_per_source_and_expert: list[int]  # [EP·L] row-major: source rank, then local expert
    tokens_per_local_expert: torch.Tensor  # [L] int64 on the host, what megatron's experts take


class DispatchPlan:
    def __init__(self, tokens_per_expert_RE: torch.Tensor):
        counts = torch.as_tensor(tokens_per_expert_RE).detach().to("cpu", torch.long)
        if counts.dim() != 2 or (counts < 0).any():
            raise ValueError(f"a dispatch plan needs non-negative [EP, E] counts, got shape "
                             f"{tuple(counts.shape)}")
        self.tokens_per_expert_RE = counts
        self.ep_size, self.num_experts = counts.shape
        if self.num_experts % self.ep_size:
            raise ValueError(f"{self.num_experts} experts do not divide over {self.ep_size} EP ranks")
        self.num_local_experts = self.num_experts // self.ep_size
        self._splits: dict[int, RankSplits] = {}

    @classmethod
    def trusted(cls, tokens_per_expert_RE: torch.Tensor) -> "DispatchPlan":
        """A plan from host int64 counts already checked (an offline book's): no validation pass."""
        plan = cls.__new__(cls)
        plan.tokens_per_expert_RE = tokens_per_expert_RE
        plan.ep_size, plan.num_experts = tokens_per_expert_RE.shape
        plan.num_local_experts = plan.num_experts // plan.ep_size
        plan._splits = {}
        return plan

    @cached_property
    def tokens_per_rank_and_local_expert_RPL(self) -> torch.Tensor:
        """[source rank, destination rank, local expert] counts."""
        return self.tokens_per_expert_RE.view(self.ep_size, self.ep_size, self.num_local_experts)

    def for_rank(self, ep_rank: int) -> RankSplits:
        """Split sizes of `ep_rank`, computed once and shared by all MoE layers."""
        if ep_rank not in self._splits:
            self._splits[ep_rank] = self._splits_of(ep_rank)
        return self._splits[ep_rank]

    def _splits_of(self, ep_rank: int) -> RankSplits:
        with host_data():  # a plan's counts live on the host
            counts_RPL = self.tokens_per_rank_and_local_expert_RPL
            received_RL = counts_RPL[:, ep_rank]
            return RankSplits(input_splits=counts_RPL[ep_rank].sum(-1).tolist(),
                              output_splits=received_RL.sum(-1).tolist(),
                              received_per_source_and_expert=received_RL.reshape(-1).tolist(),
                              tokens_per_local_expert=received_RL.sum(0).clone())

    def __eq__(self, other) -> bool:
        return (isinstance(other, DispatchPlan)
                and torch.equal(self.tokens_per_expert_RE, other.tokens_per_expert_RE))

    def __repr__(self) -> str:
        return f"DispatchPlan(tokens_per_expert_RE={self.tokens_per_expert_RE.tolist()})"


def routed_expert_counts(indices_TK: torch.Tensor, num_experts: int,
                         slot_of_expert: torch.Tensor | None = None,
                         weights_TK: torch.Tensor | None = None,
                         activation_threshold: float | None = None,
                         scaling_factor: float = 1.0) -> torch.Tensor:
    """Token copies per expert slot, [E], for tokens routed to source experts `indices_TK`:
    `routing.microbatch`'s routing of them, counted (the routers' own rule, not a copy of it)."""
    from megatron_grouter.routing.microbatch import RoutingRule, copies_per_slot, route_tokens

    if activation_threshold is not None and weights_TK is None:
        raise ValueError("counting with an activation threshold needs the gate weights")
    if weights_TK is None:
        weights_TK = torch.ones(indices_TK.shape)
    rule = RoutingRule(num_experts, None if slot_of_expert is None else slot_of_expert.long().cpu(),
                       scaling_factor, activation_threshold)
    return copies_per_slot(route_tokens(indices_TK.cpu(), weights_TK.cpu(), rule), num_experts)
