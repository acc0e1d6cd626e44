"""The pre-registered headline: the rival is the best of ALL baselines (hash included), "missed" is
said when missed, the learned-only comparison is secondary; the crossing rule; paired statistics.
Curves are written as real metrics.jsonl files and read back through metrics.read_run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce import metrics as m
from megatron_grouter.reproduce.verdict import HeadlineSpec, compare_seed, headline, paired

TOKENS = [0, 100, 200, 300, 400, 500]


def write_run(directory, losses, tokens=TOKENS) -> m.RunMetrics:
    directory.mkdir(parents=True)
    lines = [json.dumps({"step": step, "loss": 5.0, "tokens": token}) for step, token in enumerate(tokens) if step]
    lines += [json.dumps({"step": step, "val_loss": loss, "tokens": token})
              for step, (token, loss) in enumerate(zip(tokens, losses))]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return m.read_run(directory)


def seed_runs(root, tuned_final: float) -> dict[str, m.RunMetrics]:
    """hash ends lowest of the baselines; aux_loss is the best learned one."""
    curves = {"aux_loss": [8, 6, 5.0, 4.6, 4.4, 4.30], "probmoe_exact_k": [8, 6, 5.1, 4.7, 4.5, 4.40],
              "hash": [8, 6, 4.9, 4.4, 4.2, 4.10],
              "grouter_tuned": [8, 5.5, 4.6, 4.3, 4.15, tuned_final],
              "grouter_random": [8, 6, 5.0, 4.5, 4.3, 4.20]}
    return {name: write_run(root / name, losses) for name, losses in curves.items()}


def test_the_rival_is_the_best_of_all_baselines_and_missed_is_said(tmp_path):
    spec = HeadlineSpec.from_preset({"headline": {"router": "grouter_tuned", "baselines": None, "bar": 1.3}})
    per_seed, finals = {}, {}
    for seed in (1, 2, 3):
        runs = seed_runs(tmp_path / str(seed), tuned_final=4.05)
        per_seed[seed] = compare_seed(runs, spec.baselines)
        finals.update({(name, seed): float(run.val_loss[-1]) for name, run in runs.items()})
    record = per_seed[1]
    assert record["best_baseline"] == "hash"            # the fixed hash is a baseline like any other
    assert record["best_learned_baseline"] == "aux_loss"
    assert record["baselines"] == ["aux_loss", "hash", "probmoe_exact_k"]
    top = headline(per_seed, finals, spec)
    learned = headline(per_seed, finals, spec, "comparisons_learned")
    # Against hash the tuned Grouter is only a little faster: below the 1.3× bar on every seed.
    assert top["rivals"] == ["hash"] * 3 and all(1.0 < ratio < 1.3 for ratio in top["ratios"])
    assert top["verdict"] == "missed"
    # Against the best learned baseline it clears the bar: that must not become the headline.
    assert learned["verdict"] == "met" and learned["min"] >= 1.3
    assert top["paired_final_loss"]["differences"] == pytest.approx([4.05 - 4.10] * 3)
    assert top["paired_final_loss"]["negative"] == 3


def test_met_needs_every_seed_and_a_pre_registered_pool_is_respected(tmp_path):
    spec = HeadlineSpec.from_preset({"headline": {"router": "grouter_tuned", "baselines": ["aux_loss"], "bar": 1.3}})
    per_seed, finals = {}, {}
    for seed, final in ((1, 4.05), (2, 4.35)):  # seed 2 never reaches aux_loss's final loss
        runs = seed_runs(tmp_path / str(seed), tuned_final=final)
        per_seed[seed] = compare_seed(runs, spec.baselines)
        finals.update({(name, seed): float(run.val_loss[-1]) for name, run in runs.items()})
    assert per_seed[1]["best_baseline"] == "aux_loss"  # hash was not registered for this preset
    top = headline(per_seed, finals, spec)
    assert top["ratios"][0] >= 1.3 and top["ratios"][1] is None
    assert top["verdict"] == "missed" and not top["all_reached"]
    only_first = headline({1: per_seed[1]}, finals, spec)
    assert only_first["verdict"] == "met"


def test_headline_spec_refuses_grouter_rows_as_baselines():
    with pytest.raises(UserError, match="headline.baselines"):
        HeadlineSpec.from_preset({"headline": {"baselines": ["hash", "grouter_random"]}})
    with pytest.raises(UserError, match="headline.baselines"):
        HeadlineSpec.from_preset({"headline": {"baselines": "hash"}})


def test_compare_seed_says_when_no_registered_baseline_ran(tmp_path):
    runs = seed_runs(tmp_path, tuned_final=4.05)
    with pytest.raises(UserError, match="none of the headline baselines"):
        compare_seed(runs, ("z_loss",))


def test_crossing_rule_ignores_a_noisy_early_dip():
    tokens = np.asarray(TOKENS, dtype=float)
    # A dip to 4.0 at 200 tokens, back up, below 4.0 only from the last point on.
    losses = np.asarray([8.0, 5.0, 3.9, 4.6, 4.4, 3.9])
    assert m.tokens_to_reach(tokens, losses, 4.0) < 200  # the first crossing is fooled by the dip
    smooth = m.smoothed(losses)
    assert smooth[0] == losses[0] and smooth[-1] == losses[-1]
    assert smooth[2] == pytest.approx((5.0 + 3.9 + 4.6) / 3)
    stays = m.tokens_to_stay_below(tokens, losses, 4.0)
    assert 400 < stays <= 500  # only the final stretch stays below
    assert m.tokens_to_stay_below(tokens, losses, 3.8) is None  # ends above: not reached
    assert m.tokens_to_stay_below(tokens, np.asarray([3.0, 2.9, 2.8, 2.7, 2.6, 2.5]), 4.0) == 0


def test_paired_statistics():
    stats = paired([-0.1, -0.2, -0.3])
    assert stats["mean"] == pytest.approx(-0.2) and stats["std"] == pytest.approx(0.1)
    assert stats["t"] == pytest.approx(-0.2 / (0.1 / np.sqrt(3)))
    assert stats["negative"] == 3 and paired([0.5])["std"] is None


def test_verdict_waits_for_every_registered_seed_and_baseline(tmp_path):
    spec = HeadlineSpec.from_preset({"headline": {"router": "grouter_tuned", "baselines": ["aux_loss", "hash"],
                                                  "bar": 1.05}})
    runs = seed_runs(tmp_path / "1", tuned_final=4.05)
    finals = {(name, 1): float(run.val_loss[-1]) for name, run in runs.items()}
    complete = compare_seed(runs, spec.baselines)
    assert headline({1: complete}, finals, spec)["verdict"] == "met"
    # Seeds 2 and 3 of the preset have not run: not a verdict yet.
    pending = headline({1: complete}, finals, spec, expected_seeds=[1, 2, 3])
    assert pending["verdict"] == "not measured yet" and pending["incomplete_seeds"] == [2, 3]
    # A seed whose registered hash run is missing is not complete either ...
    partial = compare_seed({name: run for name, run in runs.items() if name != "hash"}, spec.baselines)
    assert partial["missing_baselines"] == ["hash"]
    assert headline({1: partial}, finals, spec)["verdict"] == "not measured yet"
    # ... but one complete seed below the bar settles it: missed.
    strict = HeadlineSpec(router="grouter_tuned", baselines=("aux_loss", "hash"), bar=1.3)
    assert headline({1: complete}, finals, strict, expected_seeds=[1, 2, 3])["verdict"] == "missed"
