"""Partial loading reads only what the chosen router needs, and knows which layers are MoE."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from tests.sources.hf_tiny_checkpoints import FAMILY_TYPES, load_full_model, make_tiny_checkpoint, tiny_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_grouter.offline.sources import HFPartialSource
from megatron_grouter.offline.sources.hf_families import FAMILIES

torch.set_num_threads(1)

_LAYER = re.compile(r"layers\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_moe_reads")
    return {
        name: make_tiny_checkpoint(name, str(root / name), seed=10 + i) for i, name in enumerate(FAMILY_TYPES)
    }


def _weight_map(model_dir: str) -> dict[str, str]:
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as handle:
        return json.load(handle)["weight_map"]


def _tensor_bytes(model_dir: str, key: str) -> int:
    with safe_open(os.path.join(model_dir, _weight_map(model_dir)[key]), framework="pt") as handle:
        tensor = handle.get_tensor(key)
    return tensor.numel() * tensor.element_size()


def _is_expert_of_the_moe_block(suffix: str) -> bool:
    # routed experts ("mlp.experts.3.w1", "mlp.experts.gate_up_proj"), shared experts and their gate
    # ("mlp.shared_experts.*", "mlp.shared_expert_gate.*"), Granite's fused experts ("input_linear"),
    # shared MLPs beside the MoE (HunYuan "mlp.shared_mlp.*", Granite "shared_mlp.*").
    parts = suffix.split(".")
    return parts[0] == "shared_mlp" or len(parts) > 2 and (
        "expert" in parts[1] or parts[1] in ("shared_mlp", "input_linear", "output_linear"))


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_reads_stop_at_the_router_of_the_chosen_layer(checkpoints, model_type):
    model_dir = checkpoints[model_type]
    all_keys = list(_weight_map(model_dir))
    assert len(set(_weight_map(model_dir).values())) >= 4  # really sharded

    moe_layers = FAMILIES[model_type].moe_layers(tiny_config(model_type))
    for layer in (moe_layers[0], moe_layers[-1]):
        source = HFPartialSource(model_dir, moe_layer=layer)

        # What layers up to the router need: the embedding, all of every earlier layer, and the
        # chosen layer without its experts (its router, attention and norms).
        expected = set()
        for key in all_keys:
            match = _LAYER.search(key)
            if key.startswith("model.embed_tokens."):
                expected.add(key)
            elif match and int(match.group(1)) < layer:
                expected.add(key)
            elif match and int(match.group(1)) == layer and not _is_expert_of_the_moe_block(key[match.end():]):
                expected.add(key)
        read = source.keys_read
        assert len(read) == len(set(read)) == source.tensors_read
        assert set(read) == expected
        assert all(int(_LAYER.search(key).group(1)) <= layer for key in read if _LAYER.search(key))
        assert source.bytes_read == sum(_tensor_bytes(model_dir, key) for key in read)
        assert source.tensors_read < len(all_keys)


def test_first_moe_layer_reads_a_small_fraction_of_a_deep_model(tmp_path):
    model_dir = make_tiny_checkpoint("deepseek_v3", str(tmp_path / "ds"), max_shard_size="64KB")
    source = HFPartialSource(model_dir)  # layer 2 of 5, experts skipped
    total_bytes = sum(os.path.getsize(os.path.join(model_dir, name)) for name in os.listdir(model_dir)
                      if name.endswith(".safetensors"))
    assert source.bytes_read < 0.5 * total_bytes
    # Later shards are never opened: deleting the shards that only hold later layers changes nothing.
    weight_map = _weight_map(model_dir)
    needed_shards = {weight_map[key] for key in source.keys_read}
    for shard in set(weight_map.values()) - needed_shards:
        os.remove(os.path.join(model_dir, shard))
    again = HFPartialSource(model_dir)
    input_ids_BS = torch.arange(3, 11).reshape(1, 8)
    torch.testing.assert_close(again.router_logits(input_ids_BS), source.router_logits(input_ids_BS))


def test_single_file_checkpoint_without_index(tmp_path):
    model_dir = make_tiny_checkpoint("mixtral", str(tmp_path / "single"), max_shard_size="100MB")
    assert not os.path.exists(os.path.join(model_dir, "model.safetensors.index.json"))
    source = HFPartialSource(model_dir, moe_layer=1, routing_target="raw")
    full = load_full_model(model_dir)
    input_ids_BS = torch.arange(3, 15).reshape(2, 6)
    with torch.no_grad():
        expected = full(input_ids=input_ids_BS, output_router_logits=True).router_logits[1].reshape(2, 6, -1)
    torch.testing.assert_close(source.router_logits(input_ids_BS), expected)
    assert all(".layers.2." not in key and ".layers.3." not in key for key in source.keys_read)
    assert not any("experts" in key for key in source.keys_read if ".layers.1." in key)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_moe_layer_rule_matches_the_modules_transformers_builds(model_type):
    config = tiny_config(model_type)
    family = FAMILIES[model_type]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    built = [index for index, layer in enumerate(model.model.layers)
             if hasattr(getattr(layer, family.router_module_path[0]), family.router_name)]
    assert family.moe_layers(config) == built
    assert 0 < len(built)
