"""mg-export: a trained target as a transformers MoE model whose logits equal our GPTModel's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_grouter.offline.export_hf import _load_gpt_model, main
from megatron_grouter.training.config import to_train_config
from tests.train_runs import MICRO_MODEL, data_overrides, train_in_process


def _train(data, out: Path, extra: list[str]) -> Path:
    train_in_process([*data_overrides(data), *MICRO_MODEL, "train.steps=3", "train.warmup_steps=1",
                      "train.save_interval=3", "train.eval_interval=0", "train.eval_iters=1",
                      "train.lr=0.01", f"train.out_dir={out}", *extra])
    return out / "checkpoints" / "step_0000003"


def _our_logits(checkpoint: Path, ids_BS: torch.Tensor) -> torch.Tensor:
    state = json.loads((checkpoint / "train_state.json").read_text())
    gpt = _load_gpt_model(checkpoint, to_train_config(state["config"]), state)
    seq = ids_BS.shape[1]
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return gpt(ids_BS, torch.arange(seq).expand_as(ids_BS), mask)


@pytest.mark.parametrize("layout, extra", [
    ("qwen3_moe", ["model.qk_layernorm=true", "model.first_dense_layers=1", "model.num_layers=3",
                   "model.num_query_groups=2"]),
    ("qwen2_moe", ["model.shared_expert_intermediate_size=32", "model.untie_embeddings=false",
                   "router.pre_softmax=true"]),
])
def test_exported_model_logits_equal_ours(stdlib_data, tmp_path, layout, extra):
    checkpoint = _train(stdlib_data, tmp_path / "run", extra)
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == layout
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert list((tmp_path / "hf").glob("*.safetensors"))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids_BS = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs_BSV = hf(input_ids=ids_BS).logits
    ours_BSV = _our_logits(checkpoint, ids_BS)
    assert ours_BSV.std() > 0.05
    torch.testing.assert_close(theirs_BSV, ours_BSV, rtol=1e-5, atol=2e-5)
    # the routing is the learned one: HF picks the same experts our routers pick
    assert hf.model.layers[-1].mlp.gate.weight.abs().sum() > 0


def test_unsupported_and_bad_inputs_are_one_line(stdlib_data, tmp_path, capsys):
    run = tmp_path / "sigmoid"
    _train(stdlib_data, run, ["router=aux_loss_free"])
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "hf")]) == 2
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "hf2")]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main([str(run), str(tmp_path / "full")]) == 2
    assert main([str(run), str(tmp_path / "hf3"), "--layout", "mixtral"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors
    assert "score_function=sigmoid" in errors[0]
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("router", ["grouter_fixed", "grouter_hybrid"])
def test_grouter_routed_target_exports_with_its_grouter_and_routes_the_same(stdlib_data, tmp_path, router):
    from tests.routing.grouter_fixtures import random_grouter

    from megatron_grouter.grouter.checkpoint import load_grouter
    from megatron_grouter.offline.hf_grouter_routing import attach_grouter
    from megatron_grouter.routing.context import RoutingContext
    from megatron_grouter.routing.microbatch import route_micro_batch
    from megatron_grouter.routing.setup import routing_rule

    grouter_dir = random_grouter(stdlib_data["tokenizer"], tmp_path / "grouter")
    checkpoint = _train(stdlib_data, tmp_path / "run", [
        f"router={router}", f"router.grouter.path={grouter_dir}", "router.grouter.source=online",
        "router.grouter.scaling_factor=1.5"])
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "attach_grouter(model, '<this directory>/grouter')" in readme
    assert (tmp_path / "hf" / "grouter" / "model.safetensors").is_file()

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids_BS = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unrouted_BSV = hf(input_ids=ids_BS, use_cache=False).logits
    attach_grouter(hf, tmp_path / "hf" / "grouter")
    with torch.no_grad():
        theirs_BSV = hf(input_ids=ids_BS, use_cache=False).logits

    state = json.loads((checkpoint / "train_state.json").read_text())
    context = RoutingContext()
    root = to_train_config(state["config"])
    gpt = _load_gpt_model(checkpoint, root, state, context=context)
    grouter, _ = load_grouter(grouter_dir)
    with torch.no_grad(), context.serving(route_micro_batch(*grouter.route(ids_BS), routing_rule(root))):
        mask = torch.triu(torch.ones(32, 32, dtype=torch.bool), 1)[None, None]
        ours_BSV = gpt(ids_BS, torch.arange(32).expand_as(ids_BS), mask)
    torch.testing.assert_close(theirs_BSV, ours_BSV, rtol=1e-5, atol=2e-5)
    assert (unrouted_BSV - ours_BSV).abs().max() > 1e-3  # the README's step is needed
