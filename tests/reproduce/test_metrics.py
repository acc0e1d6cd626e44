"""The report's measures on real metrics files and checkpoints of tiny mg-train runs."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce import metrics as m


def test_data_efficiency_interpolates_and_says_not_reached(two_runs):
    long, short = m.read_run(two_runs["long"]), m.read_run(two_runs["short"])
    assert len(long.evals) == 7 and long.tokens[-1] == 12 * 4 * 32

    # The long run against itself needs exactly its own tokens.
    assert m.data_efficiency(long, long)["ratio"] == pytest.approx(1.0)
    # The short run stops above the long run's final loss: never reached.
    behind = m.data_efficiency(long, short)
    assert behind["candidate_tokens"] is None and behind["ratio"] is None
    # The long run reaches the short run's final loss no later than the short run did, both by the
    # crossing rule (smoothed curve, stays at or below from then on).
    ahead = m.data_efficiency(short, long)
    expected = m.tokens_to_stay_below(long.tokens, long.val_loss, float(short.val_loss[-1]))
    assert ahead["baseline_tokens"] == m.tokens_to_stay_below(short.tokens, short.val_loss, float(short.val_loss[-1]))
    assert ahead["candidate_tokens"] == pytest.approx(expected)
    assert ahead["ratio"] == pytest.approx(ahead["baseline_tokens"] / expected)

    # Between two evaluations the crossing is linear in tokens.
    index = int(np.argmax(np.diff(long.val_loss) < 0)) + 1
    (t0, t1), (l0, l1) = long.tokens[index - 1:index + 1], long.val_loss[index - 1:index + 1]
    midpoint = (l0 + l1) / 2
    first_crossing = m.tokens_to_reach(long.tokens[:index + 1], long.val_loss[:index + 1], midpoint)
    assert first_crossing == pytest.approx((t0 + t1) / 2)


def test_loss_gap_pairs_equal_token_counts(two_runs):
    long, short = m.read_run(two_runs["long"]), m.read_run(two_runs["short"])
    gap = m.loss_gap(long, short)
    assert gap["tokens"] == short.tokens[1:].tolist()  # the step-0 evaluation is left out
    np.testing.assert_allclose(gap["gap"], short.val_loss[1:] - long.val_loss[1:3])


def test_grad_norm_cv_over_sliding_windows(two_runs):
    run = m.read_run(two_runs["long"])
    norms = run.series("grad_norm")
    assert len(norms) == 12
    windows = [norms[start:start + 5] for start in range(8)]
    assert m.grad_norm_cv(run, 5) == pytest.approx(np.mean([w.std() / w.mean() for w in windows]))
    assert m.grad_norm_cv(run, 50) is None  # longer than the run: n/a


def test_max_vio_and_throughput_come_from_the_log(two_runs):
    run = m.read_run(two_runs["long"])
    assert m.max_vio(run) == pytest.approx(run.series("moe/max_vio")[6:].mean())
    assert m.throughput(run) > 0


def test_missing_metrics_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        m.read_run(tmp_path / "nothing")


def test_routing_stability_on_real_checkpoints(two_runs, micro_corpus):
    from megatron_grouter.reproduce.stability import (load_model, probe_batch, routing_sets,
                                                      run_checkpoints, unchanged_share)
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    checkpoints = run_checkpoints(two_runs["long"])
    assert [path.name for path in checkpoints] == ["step_0000004", "step_0000008", "step_0000012"]
    init_distributed()
    try:
        tokens_BS, mask_BS = probe_batch(micro_corpus["prefix"], 2, 32)
        first = routing_sets(load_model(checkpoints[0]), tokens_BS, mask_BS)
        again = routing_sets(load_model(checkpoints[0]), tokens_BS, mask_BS)
        last = routing_sets(load_model(checkpoints[-1]), tokens_BS, mask_BS)
    finally:
        shutdown_distributed()
    assert len(first) == 2 and first[0].shape == (int(mask_BS.sum()), 4)
    assert all((layer.sum(axis=1) == 2).all() for layer in first)  # top-2 sets
    assert unchanged_share(first, again) == [1.0, 1.0]
    shares = unchanged_share(first, last)
    assert all(0.0 <= share < 1.0 for share in shares)  # 8 steps of training moved some tokens
