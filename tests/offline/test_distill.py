"""Distilling Grouters from real source MoEs: tiny HF checkpoints of each family, and our own."""

import json

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import load_grouter
from megatron_grouter.offline.distill import distill
from tests.offline.distill_runs import SMALL_GROUTER, compose_tool, tiny_teacher_on_corpus
from tests.train_runs import MICRO_MODEL, data_overrides, train_in_process

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "gpt_oss"]


def run_distill(data, source_kind, source_path, out_dir, steps=200, extra=()):
    return distill(compose_tool("distill", [
        f"source.kind={source_kind}", f"source.path={source_path}", f"data.prefix={data['prefix']}",
        *SMALL_GROUTER, f"train.steps={steps}", "train.batch_size=8", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.warmup_steps=20", f"train.eval_interval={steps}",
        "train.eval_batches=2", "train.log_interval=50", "train.save_interval=100000",
        f"out_dir={out_dir}", *extra]))


def first_and_last_eval(out_dir):
    evals = [json.loads(line) for line in (out_dir / "distill_metrics.jsonl").read_text().splitlines()
             if "eval_kl" in line]
    return evals[0], evals[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_distil_from_hf_family(family, stdlib_data, tmp_path):
    teacher = tiny_teacher_on_corpus(family, tmp_path / "teacher", stdlib_data["tokenizer"], 4096)
    summary = run_distill(stdlib_data, "hf", teacher, tmp_path / "out")
    start, end = first_and_last_eval(tmp_path / "out")
    print(f"{family}: KL {start['eval_kl']:.4f} -> {end['eval_kl']:.4f}, top-k overlap "
          f"{start['eval_topk_overlap']:.3f} -> {end['eval_topk_overlap']:.3f} (chance {end['chance_overlap']:.3f})")
    assert end["eval_kl"] <= 0.5 * start["eval_kl"]
    assert end["eval_topk_overlap"] >= 2 * end["chance_overlap"]
    grouter, info = load_grouter(summary["grouter"], expected_num_experts=8)
    assert grouter.config.topk == 2 and grouter.config.causal  # causal by default
    assert info.provenance["source_model"]["model_type"] == family


def test_distil_from_our_own_trained_source(stdlib_data, tmp_path):
    source = tmp_path / "source"
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "train.steps=80", "train.warmup_steps=8",
                      "train.eval_interval=0", "train.save_interval=0", f"train.out_dir={source}"])
    run_distill(stdlib_data, "megatron", source, tmp_path / "out", steps=150)
    start, end = first_and_last_eval(tmp_path / "out")
    print(f"own source: KL {start['eval_kl']:.4f} -> {end['eval_kl']:.4f}, overlap "
          f"{end['eval_topk_overlap']:.3f} (chance {end['chance_overlap']:.3f})")
    assert end["eval_kl"] < 0.7 * start["eval_kl"]
    assert end["eval_topk_overlap"] >= 2 * end["chance_overlap"]


def test_distillation_resumes(stdlib_data, tmp_path):
    teacher = tiny_teacher_on_corpus("qwen3_moe", tmp_path / "teacher", stdlib_data["tokenizer"], 4096)
    straight = run_distill(stdlib_data, "hf", teacher, tmp_path / "straight", steps=40)
    run_distill(stdlib_data, "hf", teacher, tmp_path / "resumed", steps=20)
    resumed = run_distill(stdlib_data, "hf", teacher, tmp_path / "resumed", steps=40)
    assert resumed["step"] == 40
    assert resumed["eval_kl"] == pytest.approx(straight["eval_kl"], rel=1e-6)


def test_dataset_with_another_tokenizer_is_refused(stdlib_data, tmp_path):
    from tests.sources.hf_tiny_checkpoints import make_tiny_checkpoint

    teacher = make_tiny_checkpoint("qwen3_moe", str(tmp_path / "teacher"))  # its own 320-token BPE
    with pytest.raises(UserError, match="another tokenizer"):
        run_distill(stdlib_data, "hf", teacher, tmp_path / "out", steps=1)


def test_no_moe_layer_at_index_is_refused(stdlib_data, tmp_path):
    teacher = tiny_teacher_on_corpus("qwen3_moe", tmp_path / "teacher", stdlib_data["tokenizer"], 4096)
    with pytest.raises(UserError, match="dense"):
        run_distill(stdlib_data, "hf", teacher, tmp_path / "out", steps=1, extra=["source.moe_layer=0"])


@pytest.mark.parametrize("causal", [True, False])
def test_distillation_option_chooses_a_causal_or_bidirectional_grouter(causal, stdlib_data, tmp_path):
    teacher = tiny_teacher_on_corpus("qwen3_moe", tmp_path / "teacher", stdlib_data["tokenizer"], 4096)
    summary = run_distill(stdlib_data, "hf", teacher, tmp_path / "out", steps=2,
                          extra=[f"grouter.causal={str(causal).lower()}"])
    grouter, _ = load_grouter(summary["grouter"])
    assert grouter.config.causal is causal and grouter.config.sees_future_tokens is not causal


def test_deepseek_v3_teacher_routes_by_its_real_selection_and_says_so(stdlib_data, tmp_path):
    teacher = tiny_teacher_on_corpus("deepseek_v3", tmp_path / "teacher", stdlib_data["tokenizer"], 4096)
    summary = run_distill(stdlib_data, "hf", teacher, tmp_path / "out", steps=2)
    _, info = load_grouter(summary["grouter"], expected_num_experts=8)
    source = info.provenance["source_model"]
    assert source["routing_target"] == "routed" and source["selection"] == "sigmoid_bias_group"
    assert source["raw_topk_agreement"] < 0.99
    raw = run_distill(stdlib_data, "hf", teacher, tmp_path / "raw", steps=2, extra=["source.routing_target=raw"])
    assert load_grouter(raw["grouter"], expected_num_experts=8)[1].provenance["source_model"]["routing_target"] == "raw"
