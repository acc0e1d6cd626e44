"""Capacity-constrained sample placement: exact shares, optimality, and its bounds."""

from itertools import product

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.placement.layout import placement_to_sample_rank, sequential_batches
from megatron_grouter.placement.sample_placement import best_partition, place_batches


def placed_score(score_SN, placement_QNM):
    rank_S = placement_to_sample_rank(placement_QNM, score_SN.shape[0])
    placed = np.flatnonzero(rank_S >= 0)
    return score_SN[placed, rank_S[placed]].sum()


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_every_partition_gets_equal_share_and_every_sample_once(method):
    rng = np.random.default_rng(0)
    score_SN = rng.integers(0, 50, (96, 4)) + 40 * (np.arange(96) % 3 == 0)[:, None] * np.eye(4)[0]
    batches_QB = rng.permutation(96).reshape(3, 32)
    placement_QNM = place_batches(score_SN, batches_QB, method)
    assert placement_QNM.shape == (3, 4, 8)
    for q in range(3):
        assert sorted(placement_QNM[q].ravel().tolist()) == sorted(batches_QB[q].tolist())
    assert np.unique(placement_QNM).size == 96


def test_exact_placement_matches_brute_force_and_bounds():
    rng = np.random.default_rng(1)
    score_SN = rng.integers(0, 20, (8, 2)).astype(float)
    batches_QB = sequential_batches(8, 8)
    exact = placed_score(score_SN, place_batches(score_SN, batches_QB, "exact"))
    greedy = placed_score(score_SN, place_batches(score_SN, batches_QB, "greedy"))
    brute = max(
        score_SN[np.arange(8), list(choice)].sum() for choice in product(range(2), repeat=8) if sum(choice) == 4
    )
    free = score_SN[np.arange(8), best_partition(score_SN)].sum()
    assert exact == brute
    assert greedy <= exact <= free


def test_indivisible_batch_is_refused():
    with pytest.raises(UserError, match="divisible"):
        place_batches(np.zeros((6, 4)), sequential_batches(6, 6))
