"""mg-reproduce end to end at micro scale: every stage, the report, and the stage cache."""

from __future__ import annotations

import json

import pytest

from tests.reproduce.reproduce_runs import micro_overrides, reproduce_in_process

ROUTERS = ["aux_loss", "grouter_tuned"]
STAGES = ["source", "distill", "fold", "tune", "predispatch", "target-aux_loss-s1", "target-grouter_tuned-s1",
          "target-aux_loss-s2", "target-grouter_tuned-s2", "stability"]


def done_times(out_dir) -> dict:
    return {name: (out_dir / "stages" / name / "done.json").stat().st_mtime_ns for name in STAGES}


@pytest.fixture(scope="module")
def micro_experiment(micro_corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reproduce") / "micro"
    report = reproduce_in_process(micro_overrides(out_dir, micro_corpus, ROUTERS, [1, 2], extra=["plan.train_ep=true"]))
    return out_dir, report


def test_pipeline_writes_the_report_and_figures(micro_experiment):
    out_dir, report = micro_experiment
    assert report == out_dir / "report.md"
    text = report.read_text()
    for needle in ("## Headline (pre-registered)", "`grouter_tuned` against the best baseline of all", "| aux_loss-s1 |", "| grouter_tuned-s2 |",
                   "Routing stability of learned routers", "loss_curves.png", "maxvio_vs_loss.png"):
        assert needle in text
    for figure in ("loss_curves", "maxvio_vs_loss", "grad_norm_cv", "routing_stability"):
        assert (out_dir / f"{figure}.png").stat().st_size > 1000
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["headline"]["seeds"] == [1, 2] and len(summary["headline"]["ratios"]) == 2
    assert summary["per_seed"]["1"]["best_baseline"] == "aux_loss"
    assert summary["stages"]["fold"]["to_experts"] == 4  # source 8 experts → target 4
    assert summary["stages"]["plan"]["ratios_to_default"]["dedup_sends_rank"] > 0  # volumes reported
    planned = summary["stages"]["planned_ep"]  # grouter_tuned at EP=2 under the plan, 2 processes
    assert planned["steps"] == 4 and planned["ep_tokens"] > 0 and planned["final_val_loss"] > 0
    assert "Planned EP in effect" in text
    # Routing stability: the learned run kept checkpoints at steps 2 and 4 → one transition per layer.
    stability = summary["stability"]["target-aux_loss-s1"]
    assert stability["steps"] == [4] and len(stability["unchanged_LT"]) == 2
    # Same seed, same data: both routers saw the same tokens at every evaluation.
    assert summary["runs"]["aux_loss-s1"]["tokens"] == summary["runs"]["grouter_tuned-s1"]["tokens"]


def test_rerun_skips_finished_stages_and_reruns_changed_ones(micro_experiment, micro_corpus, capsys):
    out_dir, _ = micro_experiment
    before = done_times(out_dir)
    reproduce_in_process(micro_overrides(out_dir, micro_corpus, ROUTERS, [1, 2]))
    assert done_times(out_dir) == before
    assert capsys.readouterr().out.count("skipped") >= len(STAGES)

    # A longer target budget: the Grouter stages stay, every target run and the probe rerun.
    reproduce_in_process(micro_overrides(out_dir, micro_corpus, ROUTERS, [1, 2], target_steps=6))
    after = done_times(out_dir)
    for name in ("source", "distill", "fold", "tune", "predispatch"):
        assert after[name] == before[name], name
    for name in STAGES[5:]:
        assert after[name] > before[name], name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["runs"]["aux_loss-s1"]["steps"] == 6


@pytest.fixture(scope="module")
def with_bidirectional_row(micro_corpus, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("reproduce") / "micro-bidirectional"
    routers = ["aux_loss", "grouter_tuned", "grouter_tuned_weights", "grouter_tuned_bidirectional"]
    return out_dir, reproduce_in_process(micro_overrides(out_dir, micro_corpus, routers, [1],
                                                         extra=['+tune.variants.weights=["mode=weights"]']))


def test_grouter_rows_are_causal_and_the_bidirectional_row_is_labelled(with_bidirectional_row):
    from megatron_grouter.grouter.checkpoint import load_grouter

    out_dir, report = with_bidirectional_row
    summary = json.loads((out_dir / "summary.json").read_text())
    tuned = load_grouter(summary["stages"]["tune"]["grouter"])[0].config
    bidirectional = load_grouter(summary["stages"]["tune-bidirectional"]["grouter"])[0].config
    assert tuned.causal and not bidirectional.causal
    assert not summary["runs"]["grouter_tuned-s1"]["sees_future_tokens"]
    assert summary["runs"]["grouter_tuned_bidirectional-s1"]["sees_future_tokens"]
    assert not summary["headline"]["sees_future_tokens"]
    text = report.read_text()
    assert "| grouter_tuned_bidirectional-s1 (sees future tokens) |" in text
    assert "| grouter_tuned-s1 |" in text and "grouter_tuned-s1 (sees" not in text
    assert "`grouter_tuned` against the best baseline of all" in text
    assert "| 1 | aux_loss" in text and "grouter_tuned_bidirectional (sees future tokens)" in text


def test_a_tuning_objective_variant_routes_its_own_target_run(with_bidirectional_row):
    from megatron_grouter.grouter.checkpoint import load_grouter, read_grouter_header

    out_dir, report = with_bidirectional_row
    summary = json.loads((out_dir / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["tune"]["objective"] == "bias" and stages["tune-weights"]["objective"] == "weights"
    variant = stages["tune-weights"]["grouter"]
    assert variant != stages["tune"]["grouter"] and load_grouter(variant)[0].config.causal
    assert read_grouter_header(variant)["provenance"]["history"][-1]["mode"] == "weights"
    # Its run reads its own routing cache (other routing, other loss) and is compared with the best baseline.
    assert stages["predispatch-weights"]["cache"] != stages["predispatch"]["cache"]
    assert summary["runs"]["grouter_tuned_weights-s1"]["final_val_loss"] != summary["runs"]["grouter_tuned-s1"]["final_val_loss"]
    assert "grouter_tuned_weights" in summary["per_seed"]["1"]["comparisons"]
    assert summary["per_seed"]["1"]["best_baseline"] == "aux_loss"
    text = report.read_text()
    assert "## Tuning objectives" in text
    loss = summary["runs"]["grouter_tuned_weights-s1"]["final_val_loss"]
    assert "| grouter_tuned_weights | weights |" in text and f"s1: {loss:.4f}" in text
    assert "| grouter_tuned_bidirectional (sees future tokens) | bias |" in text


def test_parallel_runs_train_target_runs_at_the_same_time(micro_experiment, micro_corpus):
    """Upstream stages cached (same keys whatever the launcher); a new target budget reruns the
    four target runs, two at a time, each its own mg-train process."""
    out_dir, _ = micro_experiment
    overrides = micro_overrides(out_dir, micro_corpus, ROUTERS, [1, 2], target_steps=5)
    overrides = [item for item in overrides if not item.startswith("launcher=")]
    reproduce_in_process([*overrides, "launcher=subprocess", "parallel_runs=2"])
    spans = {}
    for seed in (1, 2):
        for router in ROUTERS:
            stage = out_dir / "stages" / f"target-{router}-s{seed}"
            spans[(router, seed)] = ((stage / "key").stat().st_mtime, (stage / "done.json").stat().st_mtime)
    first, second = spans[("aux_loss", 1)], spans[("grouter_tuned", 1)]
    assert first[0] < second[1] and second[0] < first[1], spans  # the first seed's two runs overlapped
    summary = json.loads((out_dir / "summary.json").read_text())
    assert {name: row["steps"] for name, row in summary["runs"].items()} == {
        f"{router}-s{seed}": 5 for router in ROUTERS for seed in (1, 2)}


def test_adding_a_learned_router_probes_only_the_new_run(micro_experiment, micro_corpus):
    """The probe prunes a run's checkpoints after reading them; adding a learned router later
    reuses the earlier runs' own probe results instead of failing on their single checkpoint."""
    out_dir, _ = micro_experiment
    routers = ["aux_loss", "z_loss", "grouter_tuned"]
    reproduce_in_process(micro_overrides(out_dir, micro_corpus, routers, [1, 2], target_steps=5))
    summary = json.loads((out_dir / "stages" / "target-aux_loss-s1" / "stability.json").read_text())
    assert summary["result"]["target-aux_loss-s1"]["steps"]  # kept from the earlier probe
    assert len(list((out_dir / "stages" / "target-aux_loss-s1" / "checkpoints").glob("step_*"))) == 1
    stability = json.loads((out_dir / "summary.json").read_text())["stability"]
    assert set(stability) == {"target-aux_loss-s1", "target-z_loss-s1"}
    assert stability["target-z_loss-s1"]["steps"] and len(stability["target-z_loss-s1"]["unchanged_LT"]) == 2


def test_report_only_writes_the_finished_runs_and_names_the_missing(micro_experiment, micro_corpus, tmp_path):
    import shutil

    out_dir, _ = micro_experiment
    copy = tmp_path / "partial"
    shutil.copytree(out_dir, copy)
    (copy / "stages" / "target-grouter_tuned-s2" / "done.json").unlink()  # as if stopped by a deadline
    report = reproduce_in_process([*micro_overrides(copy, micro_corpus, ROUTERS, [1, 2]), "report_only=true"])
    text = report.read_text()
    assert "**Partial report**" in text and "grouter_tuned-s2" in text.split("have not run yet:")[1].split(".")[0]
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["headline"]["seeds"] == [1]  # only the finished seed counts
    assert "grouter_tuned-s2" not in summary["runs"] and "aux_loss-s2" in summary["runs"]
