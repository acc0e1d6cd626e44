"""Expert grouping: equal sizes, exact swap scoring, co-activation counts, planted blocks."""

import numpy as np

from megatron_grouter.placement.affinity import affinity_vectors
from megatron_grouter.placement.expert_groups import (
    affinity_cluster_groups,
    coactivation_groups,
    coactivation_matrix,
    match_experts_to_partitions,
)
from megatron_grouter.placement.group_refinement import dedup_sends, refine_groups_by_swaps, swap_gains
from megatron_grouter.placement.synthetic import planted_block_routing
from megatron_grouter.placement.token_patterns import build_patterns

from tests.placement.routing_fixtures import random_equal_groups, random_routing


def same_partition(groups_a: np.ndarray, groups_b: np.ndarray) -> bool:
    """True when two labelings split the experts identically (labels may differ)."""
    pairs = {(int(a), int(b)) for a, b in zip(groups_a, groups_b)}
    return len(pairs) == len(set(groups_a.tolist())) == len(set(groups_b.tolist()))


def test_matching_gives_equal_groups_maximising_preference():
    rng = np.random.default_rng(0)
    preference_NE = rng.random((4, 12))
    groups = match_experts_to_partitions(preference_NE)
    assert np.bincount(groups).tolist() == [3, 3, 3, 3]
    value = preference_NE[groups, np.arange(12)].sum()
    for seed in range(200):
        other = random_equal_groups(12, 4, seed)
        assert preference_NE[other, np.arange(12)].sum() <= value + 1e-12


def test_swap_gains_equal_recomputed_sends():
    topk_SLK = random_routing(30, 12, 12, 4, seed=1)
    sample_rank_S = np.random.default_rng(2).integers(0, 3, 30)
    patterns = build_patterns(topk_SLK, sample_rank_S, 12)
    assert patterns.weight_P.sum() == 30 * 12
    groups = random_equal_groups(12, 3, seed=3)
    gains_EE = swap_gains(patterns, groups, 3)
    before = dedup_sends(patterns, groups, 3)
    for a in range(12):
        for b in range(12):
            if groups[a] == groups[b]:
                assert gains_EE[a, b] == np.inf
                continue
            swapped = groups.copy()
            swapped[a], swapped[b] = groups[b], groups[a]
            assert abs(dedup_sends(patterns, swapped, 3) - before - gains_EE[a, b]) < 1e-9


def test_swap_descent_never_increases_sends_and_keeps_sizes():
    topk_SLK = random_routing(40, 16, 16, 4, seed=4)
    sample_rank_S = np.random.default_rng(5).integers(0, 4, 40)
    patterns = build_patterns(topk_SLK, sample_rank_S, 16)
    start = random_equal_groups(16, 4, seed=6)
    refined, swaps = refine_groups_by_swaps(patterns, start, 4)
    assert swaps > 0
    assert dedup_sends(patterns, refined, 4) < dedup_sends(patterns, start, 4)
    assert np.bincount(refined).tolist() == [4, 4, 4, 4]
    assert (swap_gains(patterns, refined, 4) >= -1e-9).all()


def test_coactivation_matrix_counts_tokens():
    topk_SLK = random_routing(6, 5, 8, 3, seed=7)
    coact_EE = coactivation_matrix(topk_SLK, 8, chunk_samples=4)
    tokens = [set(t.tolist()) for t in topk_SLK.reshape(-1, 3)]
    for i in range(8):
        for j in range(8):
            assert coact_EE[i, j] == sum(i in t and j in t for t in tokens)


def test_planted_blocks_are_recovered():
    topk_SLK, block_E = planted_block_routing(num_samples=2048, tokens_per_sample=64, seed=8)
    groups_paper = affinity_cluster_groups(affinity_vectors(topk_SLK, 32), 8, seed=0)
    groups_coact = coactivation_groups(topk_SLK, 32, 8)
    print(f"\nplanted blocks recovered: paper {same_partition(groups_paper, block_E)}, "
          f"co-activation {same_partition(groups_coact, block_E)}")
    assert same_partition(groups_paper, block_E)
    assert same_partition(groups_coact, block_E)
