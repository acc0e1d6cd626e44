"""Expert tuning on the default corpus: an imbalanced Grouter gets balanced, routing mostly kept."""

from __future__ import annotations


import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import load_grouter, save_grouter
from megatron_grouter.offline.convert_cli import run_tune
from megatron_grouter.offline.tuning import load_balancing_loss

from tests.offline.distill_runs import compose_tool
from tests.routing.grouter_fixtures import random_grouter, small_corpus

HEAVY_EXPERTS, EXTRA_LOGIT = (0, 1), 4.0


@pytest.fixture(scope="module")
def corpus(stdlib_data, tmp_path_factory):
    torch.set_num_threads(1)
    return small_corpus(stdlib_data, tmp_path_factory.mktemp("tune_corpus"), documents=100)


@pytest.fixture(scope="module")
def imbalanced_grouter(corpus, tmp_path_factory):
    """A random Grouter whose two favourite experts get a large extra logit (like a source's bias)."""
    root = tmp_path_factory.mktemp("tune_grouter")
    grouter, info = load_grouter(random_grouter(corpus["tokenizer"], root / "random", seed=0))
    with torch.no_grad():
        grouter.score.bias[list(HEAVY_EXPERTS)] += EXTRA_LOGIT
    return save_grouter(grouter, root / "imbalanced", provenance=info.provenance,
                        tokenizer_fingerprint=info.tokenizer)


def tune(corpus, grouter_dir, out, *extra):
    return run_tune(compose_tool("tune", [f"grouter={grouter_dir}", f"data.prefix={corpus['prefix']}",
                                          "max_tokens=400000", "target_max_vio=0.1", "eval_tokens=100000",
                                          "progress=false", f"out={out}", *extra]))


@pytest.mark.parametrize("mode, kl_weight", [("weights", 0.0), ("bias", 0.0), ("weights", 0.01)])
def test_tuning_cuts_max_violation_and_keeps_most_routing(mode, kl_weight, corpus, imbalanced_grouter, tmp_path):
    summary = tune(corpus, imbalanced_grouter, tmp_path / "tuned", f"mode={mode}", f"kl_weight={kl_weight}")
    before, after = summary["before"], summary["after"]
    print(f"{summary['objective']}: MaxVioGlobal {before['max_vio_global']:.3f} → {after['max_vio_global']:.3f} on "
          f"{after['tokens']} held-out tokens, top-k agreement {after['topk_agreement']:.3f}, "
          f"{summary['tokens']} tuning tokens ({summary['tokens_per_s']:.0f}/s), stopped by {summary['stopped_by']}")
    assert before["max_vio_global"] > 0.6 and before["topk_agreement"] == 1.0
    assert after["max_vio_global"] <= before["max_vio_global"] / 3
    assert after["topk_agreement"] >= 0.7
    tuned, info = load_grouter(summary["grouter"], expected_num_experts=8)
    source, _ = load_grouter(imbalanced_grouter)
    step = info.provenance["history"][-1]
    assert step["step"] == "tune" and step["mode"] == mode and step["after"]["max_vio_global"] == after["max_vio_global"]
    assert step["kl_weight"] == kl_weight and step["objective"] == summary["objective"]
    # The stop looks at held-out windows, not at the training batches.
    assert summary["stopped_by"].startswith("target held-out MaxVioGlobal 0.1; kept step ")
    assert summary["stop_max_vio"] <= 0.1 and step["kept_step"] == step["steps"]
    assert tuned.config.causal == source.config.causal  # tuning keeps the causality
    for name, tensor in source.state_dict().items():
        changed = not torch.equal(tensor, tuned.state_dict()[name])
        if mode == "weights":
            assert changed == name.startswith("score."), name
        else:
            assert changed == (name == "expert_bias"), name


def test_kl_to_the_distilled_routing_keeps_more_of_it_at_the_same_balance(corpus, imbalanced_grouter, tmp_path):
    alone = tune(corpus, imbalanced_grouter, tmp_path / "alone", "mode=weights", "kl_weight=0")
    anchored = tune(corpus, imbalanced_grouter, tmp_path / "anchored", "mode=weights", "kl_weight=0.01")
    print(f"top-k agreement at held-out MaxVioGlobal <= 0.1: balance loss alone {alone['after']['topk_agreement']:.3f}, "
          f"+ 0.01·KL {anchored['after']['topk_agreement']:.3f}")
    assert anchored["after"]["topk_agreement"] > alone["after"]["topk_agreement"]


def test_tuning_keeps_its_best_held_out_state_never_a_worse_one(corpus, tmp_path):
    """A near-balanced Grouter tuned with a step size that churns the routing: tuning stops after
    `patience` checks without a better held-out MaxVio and keeps the best state it saw — the
    untuned Grouter itself when no check beat it."""
    from megatron_grouter.offline.convert_cli import window_batches
    from megatron_grouter.offline.tuning import held_out_hidden, held_out_max_vio, stop_windows

    balanced = random_grouter(corpus["tokenizer"], tmp_path / "random", seed=3)
    summary = tune(corpus, balanced, tmp_path / "tuned", "mode=weights", "lr=3", "check_interval=1", "patience=3",
                   "target_max_vio=0", "stop_tokens=20000")
    step = load_grouter(summary["grouter"])[1].provenance["history"][-1]
    assert "no better held-out MaxVioGlobal in 3 checks" in summary["stopped_by"]
    assert step["steps"] == step["kept_step"] + 3 and step["patience"] == 3
    untuned, _ = load_grouter(balanced)
    tuned, _ = load_grouter(summary["grouter"])
    held_out = window_batches(untuned, corpus["prefix"], 1, 1234, "eval", 0, 1)
    first, count = stop_windows(len(held_out), held_out.windows.window, 100000, 20000)
    hidden_TH = held_out_hidden(untuned, held_out, 16, count * held_out.windows.window, first_window=first)
    start = held_out_max_vio(untuned, hidden_TH)
    kept = held_out_max_vio(tuned, hidden_TH)
    assert kept == pytest.approx(step["stop_max_vio"]) and kept <= start
    if step["kept_step"] == 0:
        assert torch.equal(tuned.score.weight, untuned.score.weight)


def test_load_balancing_loss_is_one_when_balanced_and_pushes_heavy_experts_down():
    logits_TE = torch.zeros(64, 4, requires_grad=True)
    assert load_balancing_loss(logits_TE, 1, counts_E=torch.full((4,), 16)).item() == pytest.approx(1.0)
    skewed_TE = torch.tensor([[3.0, 0, 0, 0]] * 64, requires_grad=True)
    loss = load_balancing_loss(skewed_TE, 1)
    loss.backward()
    assert loss.item() > 1.5 and (skewed_TE.grad[:, 0] > 0).all()


def test_bad_settings_are_refused(corpus, imbalanced_grouter, tmp_path):
    with pytest.raises(UserError, match="mode"):
        tune(corpus, imbalanced_grouter, tmp_path / "x", "mode=nonsense")
    with pytest.raises(UserError, match="max_tokens"):
        tune(corpus, imbalanced_grouter, tmp_path / "x", "max_tokens=0")
    with pytest.raises(UserError, match="kl_weight"):
        tune(corpus, imbalanced_grouter, tmp_path / "x", "mode=bias", "kl_weight=1")
