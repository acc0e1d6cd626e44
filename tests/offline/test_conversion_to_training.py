"""The documented conversion path, end to end: fold a Grouter to E/4, expand it to 2E, tune the
expanded one on the corpus, and train megatron MoE models with each of them frozen."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import load_grouter
from megatron_grouter.offline.convert_cli import run_affinity, run_expand, run_fold, run_tune

from tests.offline.distill_runs import compose_tool
from tests.routing.grouter_fixtures import TOPK, random_grouter, small_corpus
from tests.train_runs import read_metrics, train_in_process

SOURCE_EXPERTS = 16


@pytest.fixture(scope="module")
def converted(stdlib_data, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("conversion")
    corpus = small_corpus(stdlib_data, root / "corpus", documents=40)
    source = random_grouter(corpus["tokenizer"], root / "source", seed=7, num_experts=SOURCE_EXPERTS)
    data = [f"data.prefix={corpus['prefix']}"]
    run_affinity(compose_tool("affinity", [f"grouter={source}", *data, "progress=false",
                                           f"out={root / 'affinity'}"]))
    folded = run_fold(compose_tool("fold", [f"grouter={source}", f"affinity={root / 'affinity'}",
                                            f"num_experts={SOURCE_EXPERTS // 4}", f"out={root / 'folded'}"]))
    expanded = run_expand(compose_tool("expand", [f"grouter={source}", *data, "max_tokens=20000",
                                                  f"num_experts={2 * SOURCE_EXPERTS}",
                                                  f"out={root / 'expanded'}"]))
    tuned = run_tune(compose_tool("tune", [f"grouter={expanded['grouter']}", *data, "max_tokens=600000",
                                           "lr=3e-3", "target_max_vio=0.1", "eval_tokens=40000", "progress=false", "mode=weights", "kl_weight=0.01",
                                           f"out={root / 'tuned'}"]))
    return {"corpus": corpus, "folded": folded["grouter"], "expanded": expanded, "tuned": tuned}


def routed_training(corpus, grouter: str, num_experts: int, out_dir: Path, steps: int = 4) -> list[dict]:
    train_in_process([f"data.prefix={corpus['prefix']}", f"data.tokenizer={corpus['tokenizer']}",
                      f"data.out_dir={corpus['out_dir']}", "model.num_layers=2", "model.hidden_size=64",
                      "model.num_attention_heads=4", "model.ffn_hidden_size=128",
                      f"model.num_experts={num_experts}", "model.moe_ffn_hidden_size=32", f"model.topk={TOPK}",
                      "train.seq_length=64", "train.micro_batch_size=4", "train.global_batch_size=8",
                      f"train.steps={steps}", "train.warmup_steps=1", "train.eval_interval=0",
                      "train.save_interval=-1", f"train.out_dir={out_dir}", "router=grouter_fixed",
                      f"router.grouter.path={grouter}", "router.grouter.source=online"])
    return [record for record in read_metrics(out_dir) if "loss" in record]


def test_folded_grouter_trains_a_model_with_a_quarter_of_the_experts(converted, tmp_path):
    folded, _ = load_grouter(converted["folded"], expected_num_experts=SOURCE_EXPERTS // 4)
    records = routed_training(converted["corpus"], converted["folded"], SOURCE_EXPERTS // 4, tmp_path)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(record["moe/active_experts"] == TOPK for record in records)
    with pytest.raises(UserError, match=f"{SOURCE_EXPERTS // 4} experts"):
        routed_training(converted["corpus"], converted["folded"], SOURCE_EXPERTS, tmp_path / "wrong")


def test_expanded_then_tuned_grouter_is_balanced_and_trains_twice_the_experts(converted, tmp_path):
    expanded = converted["expanded"]
    assert expanded["violation_rate"] == 0.0
    tuned = converted["tuned"]
    before, after = tuned["before"], tuned["after"]
    print(f"expanded {SOURCE_EXPERTS}→{2 * SOURCE_EXPERTS}, tuned: MaxVioGlobal {before['max_vio_global']:.3f} → "
          f"{after['max_vio_global']:.3f}, top-k agreement {after['topk_agreement']:.3f}")
    # Held-out documents of a 40-file corpus: frequent tokens pinned to one expert bound what a
    # score-layer nudge can balance here; the 3× cut on a real corpus is test_tuning's. The corpus is
    # the running interpreter's standard library, so each CI lane tunes on other files: measured
    # 0.897 → 0.458 (agreement 0.81) on Python 3.11, 0.699 → 0.655 (agreement 0.95) on 3.12, where
    # the best held-out check comes early and tuning keeps it. The small KL term (kl_weight=0.01)
    # keeps the routing either way.
    assert after["max_vio_global"] < before["max_vio_global"] and after["topk_agreement"] >= 0.7
    grouter, info = load_grouter(tuned["grouter"], expected_num_experts=2 * SOURCE_EXPERTS)
    assert grouter.config.expert_groups is not None
    assert [step["step"] for step in info.provenance["history"]][-2:] == ["expand", "tune"]
    records = routed_training(converted["corpus"], tuned["grouter"], 2 * SOURCE_EXPERTS, tmp_path)
    assert len(records) == 4 and all(record["moe/active_experts"] == TOPK for record in records)
    with pytest.raises(UserError, match="expanded"):
        run_fold(compose_tool("fold", [f"grouter={tuned['grouter']}", "strategy=random", "num_experts=8",
                                       f"out={tmp_path / 'refold'}"]))
