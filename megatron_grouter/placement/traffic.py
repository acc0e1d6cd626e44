"""EP dispatch traffic of each training step, counted on the host from routing and placement.

For every token a rank trains on, its top-k Grouter experts live on EP ranks given by
`expert_to_rank` (the plan's, or Megatron's contiguous default). Counted per step:
- pairs leaving the rank (node): token-expert pairs whose expert is on another rank (node);
- dedup sends to ranks (nodes): a token goes once to each other rank (node) hosting any of its
  experts, as DeepEP sends it — what all-to-all time follows.
Each rank counts its own tokens; the step's totals are summed over the data-parallel group.
Node of EP rank r: r // ranks_per_node.
"""

from __future__ import annotations

import numpy as np
import torch


FIELDS = ("tokens", "pairs_leaving_rank", "pairs_leaving_node", "sends_rank", "sends_node")


def _remote_distinct(owner_TK: np.ndarray, own: int) -> int:
    """Σ_t number of distinct values ≠ own in row t."""
    sorted_TK = np.sort(owner_TK, axis=1)
    first_TK = np.ones(sorted_TK.shape, dtype=bool)
    first_TK[:, 1:] = sorted_TK[:, 1:] != sorted_TK[:, :-1]
    return int((first_TK & (sorted_TK != own)).sum())


def token_traffic(indices_TK: np.ndarray, expert_to_rank: np.ndarray, rank: int, ranks_per_node: int) -> dict[str, int]:
    """Traffic of the tokens trained on EP rank `rank` (indices_TK: their Grouter expert ids)."""
    rank_TK = np.asarray(expert_to_rank, dtype=np.int64)[np.asarray(indices_TK, dtype=np.int64)]
    node_TK, node = rank_TK // ranks_per_node, rank // ranks_per_node
    return {"tokens": int(rank_TK.shape[0]),
            "pairs_leaving_rank": int((rank_TK != rank).sum()),
            "pairs_leaving_node": int((node_TK != node).sum()),
            "sends_rank": _remote_distinct(rank_TK, rank),
            "sends_node": _remote_distinct(node_TK, node)}


class EPTrafficMeter:
    """Counts each training micro-batch's traffic from its routing (expert slots: EP rank r holds
    slots [r·L, (r+1)·L), whatever the placement plan put there) and reports the step's totals,
    summed over ranks, as `ep/*` metrics. A routing observer and a trainer hook."""

    def __init__(self, num_experts: int, ep_size: int, ep_rank: int, ranks_per_node: int, group=None):
        self.rank_of_slot = np.arange(num_experts, dtype=np.int64) // (num_experts // ep_size)
        self.ep_rank = ep_rank
        self.ranks_per_node = ranks_per_node
        self.group = group
        self.totals = dict.fromkeys(FIELDS, 0)

    def observe(self, routings: list, training: bool) -> None:
        if not training:  # evaluation traffic is not training traffic
            return
        for routing in routings:
            slots_SBK = routing.tokens_SBK.slots
            counts = token_traffic(slots_SBK.reshape(-1, slots_SBK.shape[-1]).cpu().numpy(), self.rank_of_slot,
                                   self.ep_rank, self.ranks_per_node)
            for name, value in counts.items():
                self.totals[name] += value

    def step_sums(self) -> dict[str, torch.Tensor]:
        """This rank's traffic of the step (host), summed over ranks by the trainer at log steps."""
        counts = torch.tensor([self.totals[name] for name in FIELDS], dtype=torch.float64)
        self.totals = dict.fromkeys(FIELDS, 0)
        return {"ep_traffic": counts}

    # every tensor-parallel rank observes the whole micro-batch: count it once
    tensor_parallel_copies = ("ep_traffic",)

    @staticmethod
    def summarise_sums(sums: dict[str, torch.Tensor]) -> dict:
        return {f"ep/{name}": int(value) for name, value in zip(FIELDS, sums["ep_traffic"].tolist())}
