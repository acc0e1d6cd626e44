"""Affinity vectors, rank hits and volumes against slow per-token reference loops."""

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.placement.affinity import affinity_vectors, informative_sample_mask, normalised_entropy
from megatron_grouter.placement.layout import contiguous_expert_to_rank, default_placement, placement_to_sample_rank, sequential_batches
from megatron_grouter.placement.rank_hits import rank_hits
from megatron_grouter.placement.routing_input import check_topk
from megatron_grouter.placement.volumes import compute_volumes
from tests.placement.routing_fixtures import random_equal_groups, random_routing


def reference_volumes(topk_SLK, expert_to_rank, sample_rank_S, ranks_per_node):
    """Token-by-token loop that spells out each volume's definition."""
    totals = dict(pairs_rank=0, pairs_node=0, sends_rank=0, sends_node=0)
    sends_per_rank = {}
    recvs_per_rank = {}
    for s, sample in enumerate(topk_SLK):
        own = int(sample_rank_S[s])
        if own < 0:
            continue
        for token in sample:
            ranks = [int(expert_to_rank[e]) for e in token]
            nodes = [r // ranks_per_node for r in ranks]
            totals["pairs_rank"] += sum(r != own for r in ranks)
            totals["pairs_node"] += sum(n != own // ranks_per_node for n in nodes)
            remote = set(ranks) - {own}
            totals["sends_rank"] += len(remote)
            totals["sends_node"] += len(set(nodes) - {own // ranks_per_node})
            sends_per_rank[own] = sends_per_rank.get(own, 0) + len(remote)
            for r in remote:
                recvs_per_rank[r] = recvs_per_rank.get(r, 0) + 1
    return totals, sends_per_rank, recvs_per_rank


def test_volumes_equal_reference_loop():
    num_experts, ranks, ranks_per_node = 16, 4, 2
    topk_SLK = random_routing(24, 10, num_experts, 3, seed=1)
    expert_to_rank = random_equal_groups(num_experts, ranks, seed=2)
    sample_rank_S = np.random.default_rng(3).integers(-1, ranks, 24)
    volumes = compute_volumes(topk_SLK, expert_to_rank, sample_rank_S, ranks, ranks_per_node)
    totals, sends, recvs = reference_volumes(topk_SLK, expert_to_rank, sample_rank_S, ranks_per_node)
    assert volumes.pairs_leaving_rank == totals["pairs_rank"]
    assert volumes.pairs_leaving_node == totals["pairs_node"]
    assert volumes.dedup_sends_rank == totals["sends_rank"]
    assert volumes.dedup_sends_node == totals["sends_node"]
    assert volumes.sends_per_rank.tolist() == [sends.get(r, 0) for r in range(ranks)]
    assert volumes.recvs_per_rank.tolist() == [recvs.get(r, 0) for r in range(ranks)]
    assert volumes.tokens == int((sample_rank_S >= 0).sum()) * 10


@pytest.mark.parametrize("num_ranks", [3, 12, 40, 72])
def test_rank_hits_equal_reference_loop(num_ranks):
    # 3..64 ranks use the bitmask path (1, 2 and 8 byte masks), 72 the sort-based path
    # token positions picked by an index array, as in the planner's search subsample (non C-ordered)
    topk_SLK = random_routing(7, 18, 144, 6, seed=4)[:, np.arange(0, 18, 2)]
    expert_to_rank = np.random.default_rng(5).integers(0, num_ranks, 144)
    hit_SN, distinct_S = rank_hits(topk_SLK, expert_to_rank, num_ranks, chunk_tokens=20)
    for s in range(7):
        token_ranks = [{int(expert_to_rank[e]) for e in token} for token in topk_SLK[s]]
        assert distinct_S[s] == sum(len(r) for r in token_ranks)
        assert hit_SN[s].tolist() == [sum(n in r for r in token_ranks) for n in range(num_ranks)]


def test_default_layout_is_contiguous_and_in_order():
    assert contiguous_expert_to_rank(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    placement = default_placement(sequential_batches(17, 8), 4)
    assert placement.shape == (2, 4, 2)
    assert placement_to_sample_rank(placement, 17).tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2 + [-1]


def test_affinity_and_entropy():
    topk_SLK = random_routing(5, 20, 8, 2, seed=6)
    phi_SE = affinity_vectors(topk_SLK, 8)
    np.testing.assert_allclose(phi_SE.sum(axis=1), 2.0, rtol=1e-6)
    np.testing.assert_allclose(phi_SE[0, 3], np.mean([(3 in t) for t in topk_SLK[0]]), rtol=1e-6)
    uniform = np.full((1, 8), 0.25)
    peaked = np.array([[1.0, 1.0] + [0.0] * 6])
    entropy = normalised_entropy(np.concatenate([uniform, peaked]))
    np.testing.assert_allclose(entropy, [1.0, np.log(2) / np.log(8)])
    assert informative_sample_mask(np.concatenate([uniform, peaked]), 0.9).tolist() == [False, True]


@pytest.mark.parametrize(
    "topk, message",
    [
        (np.zeros((2, 3)), "shape"),
        (np.array([[[0, 9]]]), "in \\[0, 8\\)"),
        (np.array([[[1, 1]]]), "twice"),
        (np.array([[[0.0, 1.0]]]), "integer"),
    ],
)
def test_bad_routing_is_refused(topk, message):
    with pytest.raises(UserError, match=message):
        check_topk(topk, 8)
