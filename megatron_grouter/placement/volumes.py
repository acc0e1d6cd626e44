"""Communication volumes of an EP layout, the numbers the planner is judged by.

Two counts, each at rank level and at node level (a node holds `ranks_per_node` ranks):
- pairs: token-expert pairs whose expert lives off the token's rank (node);
- dedup sends: a token is sent once to each remote rank (node) that hosts any of its experts,
  as DeepEP dispatches it. Per-rank send and receive totals show the all-to-all bottleneck.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.affinity import expert_token_counts
from megatron_grouter.placement.rank_hits import local_pairs, rank_hits


@dataclass(frozen=True)
class Volumes:
    """Dispatch volumes of one layout over the placed samples."""

    tokens: int
    pairs: int
    pairs_leaving_rank: int
    pairs_leaving_node: int
    dedup_sends_rank: int
    dedup_sends_node: int
    sends_per_rank: np.ndarray
    recvs_per_rank: np.ndarray
    sends_per_node: np.ndarray
    # token-expert pairs sent from the token's rank (row) to the expert's rank (column): what a
    # pair-wise all-to-all (megatron's, the planned dispatcher) moves; the diagonal stays local
    pairs_RR: np.ndarray | None = None

    def ratios_to(self, baseline: "Volumes") -> dict[str, float | None]:
        """This layout's volumes divided by the baseline's (lower is better); None where the
        baseline has no such traffic (node volumes on one node), so no report prints nan."""

        def ratio(ours: float, theirs: float) -> float | None:
            return float(ours) / float(theirs) if theirs else None

        return {
            "dedup_sends_rank": ratio(self.dedup_sends_rank, baseline.dedup_sends_rank),
            "pairs_leaving_rank": ratio(self.pairs_leaving_rank, baseline.pairs_leaving_rank),
            "dedup_sends_node": ratio(self.dedup_sends_node, baseline.dedup_sends_node),
            "pairs_leaving_node": ratio(self.pairs_leaving_node, baseline.pairs_leaving_node),
            "max_sends_rank": ratio(self.sends_per_rank.max(), baseline.sends_per_rank.max()),
            "max_recvs_rank": ratio(self.recvs_per_rank.max(), baseline.recvs_per_rank.max()),
        }

    def summary(self) -> dict[str, int]:
        """Scalar fields only, for logs and json."""
        return {k: int(v) for k, v in asdict(self).items() if np.isscalar(v)}


def compute_volumes(
    topk_SLK: np.ndarray,
    expert_to_rank: np.ndarray,
    sample_rank_S: np.ndarray,
    num_ranks: int,
    ranks_per_node: int,
) -> Volumes:
    """Volumes for samples with sample_rank_S >= 0 (samples outside every batch are ignored)."""
    if num_ranks % ranks_per_node != 0:
        raise UserError(f"{num_ranks} ranks do not fill nodes of {ranks_per_node} ranks; fix ranks_per_node")
    num_experts = int(expert_to_rank.shape[0])
    placed = np.flatnonzero(np.asarray(sample_rank_S) >= 0)
    topk_SLK = topk_SLK[placed]
    rank_S = np.asarray(sample_rank_S, dtype=np.int64)[placed]
    rows = np.arange(placed.size)
    num_nodes = num_ranks // ranks_per_node
    expert_to_node = np.asarray(expert_to_rank, dtype=np.int64) // ranks_per_node
    node_S = rank_S // ranks_per_node

    hit_SN, distinct_S = rank_hits(topk_SLK, expert_to_rank, num_ranks)
    node_hit_SN, node_distinct_S = rank_hits(topk_SLK, expert_to_node, num_nodes)
    counts_SE = expert_token_counts(topk_SLK, num_experts)
    tokens = int(topk_SLK.shape[0] * topk_SLK.shape[1])
    pairs = tokens * int(topk_SLK.shape[2])

    sends_S = distinct_S - hit_SN[rows, rank_S]
    node_sends_S = node_distinct_S - node_hit_SN[rows, node_S]
    pairs_SN = local_pairs(counts_SE, expert_to_rank, num_ranks)
    pairs_RR = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    np.add.at(pairs_RR, rank_S, pairs_SN)
    remote_hits_SN = hit_SN.copy()
    remote_hits_SN[rows, rank_S] = 0
    return Volumes(
        tokens=tokens,
        pairs=pairs,
        pairs_leaving_rank=pairs - int(pairs_SN[rows, rank_S].sum()),
        pairs_leaving_node=pairs - int(local_pairs(counts_SE, expert_to_node, num_nodes)[rows, node_S].sum()),
        dedup_sends_rank=int(sends_S.sum()),
        dedup_sends_node=int(node_sends_S.sum()),
        sends_per_rank=np.bincount(rank_S, weights=sends_S, minlength=num_ranks).astype(np.int64),
        recvs_per_rank=remote_hits_SN.sum(axis=0),
        sends_per_node=np.bincount(node_S, weights=node_sends_S, minlength=num_nodes).astype(np.int64),
        pairs_RR=pairs_RR,
    )
