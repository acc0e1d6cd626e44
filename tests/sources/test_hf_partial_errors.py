"""Bad checkpoints, layer choices and inputs end in a one-line UserError that says what to do."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tests.sources.hf_tiny_checkpoints import VOCAB_SIZE, make_tiny_checkpoint

from megatron_grouter.errors import UserError
from megatron_grouter.offline.sources import HFPartialSource

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    # Layers 0 and 2 are dense (mlp_only_layers), 1, 3 and 4 are MoE.
    return make_tiny_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("err") / "qwen"))


@pytest.fixture
def qwen_copy(qwen_dir, tmp_path) -> str:
    return shutil.copytree(qwen_dir, str(tmp_path / "copy"))


def _weight_map(model_dir: str) -> dict[str, str]:
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as handle:
        return json.load(handle)["weight_map"]


def test_dense_layer_is_rejected_with_the_moe_layers(qwen_dir):
    with pytest.raises(UserError, match=r"layer 0 of qwen is dense; MoE layers are 1, 3, 4"):
        HFPartialSource(qwen_dir, moe_layer=0)
    with pytest.raises(UserError, match=r"layer 2 of qwen is dense"):
        HFPartialSource(qwen_dir, moe_layer=2)


def test_dense_prefix_of_deepseek_is_reported_as_a_range(tmp_path):
    model_dir = make_tiny_checkpoint("deepseek_v3", str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"layer 1 of ds is dense; MoE layers are 2\.\.4"):
        HFPartialSource(model_dir, moe_layer=1)


def test_layer_outside_the_model_or_not_an_int(qwen_dir):
    with pytest.raises(UserError, match=r"moe_layer 5 is outside qwen's 5 layers"):
        HFPartialSource(qwen_dir, moe_layer=5)
    with pytest.raises(UserError, match=r"moe_layer must be an integer"):
        HFPartialSource(qwen_dir, moe_layer="1")


def test_missing_needed_shard_is_named(qwen_copy):
    shard = _weight_map(qwen_copy)["model.layers.1.mlp.gate.weight"]
    os.remove(os.path.join(qwen_copy, shard))
    with pytest.raises(UserError, match=rf"shard {shard} listed in model.safetensors.index.json is missing"):
        HFPartialSource(qwen_copy)


def test_no_safetensors_at_all(qwen_copy):
    for name in os.listdir(qwen_copy):
        if "safetensors" in name:
            os.remove(os.path.join(qwen_copy, name))
    with pytest.raises(UserError, match=r"no model.safetensors.index.json or model.safetensors"):
        HFPartialSource(qwen_copy)


def test_index_naming_a_tensor_no_longer_there_is_an_incomplete_checkpoint(qwen_copy):
    index_path = os.path.join(qwen_copy, "model.safetensors.index.json")
    with open(index_path) as handle:
        index = json.load(handle)
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    with open(index_path, "w") as handle:
        json.dump(index, handle)
    with pytest.raises(UserError, match=r"lacks tensors for model\.layers\.0\.self_attn\.q_proj\.weight"):
        HFPartialSource(qwen_copy)


def test_missing_config_and_unsupported_model_type(qwen_copy, tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        HFPartialSource(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match=r"no config.json"):
        HFPartialSource(str(tmp_path / "empty"))

    config_path = os.path.join(qwen_copy, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    with open(config_path, "w") as handle:
        json.dump({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}, handle)
    with pytest.raises(UserError, match=r"model_type 'llama' .* is not a supported MoE teacher; supported: "):
        HFPartialSource(qwen_copy)


def test_quantized_checkpoint_is_refused(qwen_copy):
    config_path = os.path.join(qwen_copy, "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with open(config_path, "w") as handle:
        json.dump(config, handle)
    with pytest.raises(UserError, match=r"holds fp8 weights; dequantize"):
        HFPartialSource(qwen_copy)


def test_bad_token_batches(qwen_dir):
    source = HFPartialSource(qwen_dir)
    with pytest.raises(UserError, match=r"2-D \[batch, seq\]"):
        source.router_logits(torch.tensor([3, 4, 5]))
    with pytest.raises(UserError, match=r"integer tensor"):
        source.router_logits(torch.rand(1, 4))
    with pytest.raises(UserError, match=rf"teacher vocabulary is \[0, {VOCAB_SIZE}\)"):
        source.router_logits(torch.tensor([[3, VOCAB_SIZE]]))
    with pytest.raises(UserError, match=r"attention_mask has shape \(1, 2\)"):
        source.router_logits(torch.tensor([[3, 4, 5]]), torch.ones(1, 2))
    with pytest.raises(UserError, match=r"floating torch dtype"):
        HFPartialSource(qwen_dir, dtype=torch.int8)
