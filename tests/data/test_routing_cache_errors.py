"""A damaged routing cache is refused in one line when it is opened, not inside the MoE layer."""

import json

import numpy as np
import pytest
import torch

from megatron_grouter.data.routing_cache import CHECKED_FILE, open_cache, write_cache
from megatron_grouter.data.tokenizer import load_tokenizer
from megatron_grouter.errors import UserError
from megatron_grouter.grouter import Grouter, GrouterConfig
from tests.tiny_dataset import tiny_dataset

NUM_EXPERTS, TOPK, WINDOW = 6, 2, 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = tiny_dataset(root / "data", documents=12)
    torch.manual_seed(0)
    grouter = Grouter(GrouterConfig(vocab_size=load_tokenizer(data["tokenizer"]).vocab_size,
                                    num_experts=NUM_EXPERTS, topk=TOPK, hidden_size=16, num_layers=1,
                                    num_heads=2, max_seq_length=WINDOW)).eval()
    write_cache(root / "cache", data["prefix"], grouter, "test-grouter", WINDOW, progress=False)
    return {"dir": root / "cache", "prefix": data["prefix"]}


def copy_of(cache, tmp_path):
    target = tmp_path / "cache"
    target.mkdir()
    for name in ("manifest.json", "indices.bin", "weights.bin"):
        (target / name).write_bytes((cache["dir"] / name).read_bytes())
    return target


def test_intact_cache_opens_and_its_check_is_remembered(cache, tmp_path):
    directory = copy_of(cache, tmp_path)
    opened = open_cache(directory, cache["prefix"], num_experts=NUM_EXPERTS, topk=TOPK)
    assert int(np.asarray(opened.indices).max()) < NUM_EXPERTS
    assert (directory / CHECKED_FILE).is_file()


def test_truncated_manifest_is_one_line(cache, tmp_path):
    directory = copy_of(cache, tmp_path)
    text = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(text[:len(text) // 2])
    with pytest.raises(UserError, match="manifest .* is truncated or not JSON; rerun mg-predispatch"):
        open_cache(directory, cache["prefix"])


def test_manifest_without_a_field_is_one_line(cache, tmp_path):
    directory = copy_of(cache, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["num_experts"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no valid 'num_experts'"):
        open_cache(directory, cache["prefix"], num_experts=NUM_EXPERTS)


def test_expert_ids_out_of_range_are_refused_on_open(cache, tmp_path):
    directory = copy_of(cache, tmp_path)
    indices = np.fromfile(directory / "indices.bin", dtype=np.uint8)
    indices[[0, 7, 20]] = [NUM_EXPERTS, 200, 255]
    indices.tofile(directory / "indices.bin")
    with pytest.raises(UserError, match=f"holds 3 expert ids outside 0..{NUM_EXPERTS - 1}"):
        open_cache(directory, cache["prefix"], num_experts=NUM_EXPERTS, topk=TOPK)


def test_cache_for_fewer_experts_names_mg_expand(cache, tmp_path):
    with pytest.raises(UserError) as refused:
        open_cache(cache["dir"], cache["prefix"], num_experts=2 * NUM_EXPERTS)
    assert "mg-expand" in str(refused.value) and "fold" not in str(refused.value)
    with pytest.raises(UserError, match="mg-fold"):
        open_cache(cache["dir"], cache["prefix"], num_experts=NUM_EXPERTS // 2)
