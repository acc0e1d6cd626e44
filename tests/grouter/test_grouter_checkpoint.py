"""Grouter checkpoints: exact round trip, one-line refusals, atomic replacement, fingerprint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter import (grouter_fingerprint, load_grouter, new_provenance, save_grouter,
                                      with_history_step)

from tests.grouter.grouter_fixtures import TOKENIZER, random_ids, tiny_grouter

torch.set_num_threads(1)
PROVENANCE = new_provenance(source_model="Qwen/Qwen3-30B-A3B", source_layer=0, tokens_seen=12345)


def saved(tmp_path, name="grouter", seed=0, **overrides):
    model = tiny_grouter(seed=seed, **overrides)
    return model, save_grouter(model, tmp_path / name, PROVENANCE, TOKENIZER)


def refusal(directory, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        load_grouter(directory, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(dtype="bfloat16", score_function="sigmoid", scaling_factor=2.0),
    dict(encoder="residual_linear", score_bias=False),
    dict(causal=False),
])
def test_round_trip_is_bitwise(tmp_path, overrides):
    model, directory = saved(tmp_path, **overrides)
    with torch.no_grad():
        model.expert_bias.copy_(torch.linspace(-1, 1, 12))
    save_grouter(model, directory, PROVENANCE, TOKENIZER)
    loaded, info = load_grouter(directory, expected_num_experts=12, expected_tokenizer=TOKENIZER)
    ids_BS = random_ids(2, 16)
    mask_BS = torch.ones(2, 16, dtype=torch.bool)
    mask_BS[1, 9:] = False
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids_BS, mask_BS), model.logits(ids_BS, mask_BS))
        for ours, theirs in zip(loaded.route(ids_BS, mask_BS), model.route(ids_BS, mask_BS)):
            assert torch.equal(ours, theirs)
    assert torch.equal(loaded.expert_bias, model.expert_bias)
    assert info.config == model.config and info.num_experts == 12
    assert info.tokenizer == TOKENIZER and info.provenance == PROVENANCE


def test_config_json_layout(tmp_path):
    _, directory = saved(tmp_path)
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors"]
    header = json.loads((directory / "config.json").read_text())
    assert header["format"] == "megatron-grouter/grouter" and header["format_version"] == 1
    assert header["num_experts"] == header["architecture"]["num_experts"] == 12
    assert header["tokenizer"] == TOKENIZER
    assert set(header["provenance"]) >= {"source_model", "source_layer", "tokens_seen", "history"}


def test_history_is_kept_across_saves(tmp_path):
    model, directory = saved(tmp_path)
    _, info = load_grouter(directory)
    provenance = with_history_step(info.provenance, {"step": "tune", "mode": "bias", "tokens": 50})
    save_grouter(model, directory, provenance, TOKENIZER)
    _, info = load_grouter(directory)
    assert info.provenance["history"] == [{"step": "tune", "mode": "bias", "tokens": 50}]
    assert info.provenance["source_model"] == PROVENANCE["source_model"]
    assert PROVENANCE["history"] == []


def test_refuses_expert_count_mismatch(tmp_path):
    _, directory = saved(tmp_path)
    message = refusal(directory, expected_num_experts=16)
    assert "has 12 experts but the model has 16" in message and "mg-expand" in message  # fewer: expand
    message = refusal(directory, expected_num_experts=8)
    assert "has 12 experts but the model has 8" in message and "mg-fold" in message  # more: fold


@pytest.mark.parametrize("tokenizer", [
    {"vocab_size": 96, "sha256": TOKENIZER["sha256"]},
    {"vocab_size": TOKENIZER["vocab_size"], "sha256": "cd" * 32},
])
def test_refuses_other_tokenizer(tmp_path, tokenizer):
    _, directory = saved(tmp_path)
    assert "another tokenizer" in refusal(directory, expected_tokenizer=tokenizer)


def test_refuses_missing_directory_and_files(tmp_path):
    assert "does not exist" in refusal(tmp_path / "nowhere")
    _, directory = saved(tmp_path)
    (directory / "model.safetensors").unlink()
    assert "lacks model.safetensors" in refusal(directory)
    (directory / "config.json").unlink()
    assert "lacks config.json and model.safetensors" in refusal(directory)


def test_refuses_wrong_format_and_version(tmp_path):
    _, directory = saved(tmp_path)
    header = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**header, "format_version": 2}))
    assert "format_version=2" in refusal(directory)
    (directory / "config.json").write_text(json.dumps({**header, "format": "hf"}))
    assert "not a Grouter checkpoint" in refusal(directory)
    (directory / "config.json").write_text("{not json")
    assert "unreadable config.json" in refusal(directory)


def test_refuses_truncated_and_corrupted_tensors(tmp_path):
    _, directory = saved(tmp_path)
    tensors = directory / "model.safetensors"
    original = tensors.read_bytes()
    tensors.write_bytes(original[: len(original) // 2])
    assert "checksum" in refusal(directory)
    flipped = bytearray(original)
    flipped[len(flipped) - 10] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    assert "checksum" in refusal(directory)


def test_refuses_unreadable_or_mismatched_tensors_without_checksum(tmp_path):
    _, directory = saved(tmp_path)
    header = json.loads((directory / "config.json").read_text())
    del header["config_sha256"]  # as saved before config checksums (unverified, still read)
    del header["tensors_sha256"]
    (directory / "config.json").write_text(json.dumps(header))
    tensors = directory / "model.safetensors"
    original = tensors.read_bytes()
    tensors.write_bytes(original[: len(original) // 2])
    assert "unreadable model.safetensors" in refusal(directory)
    tensors.write_bytes(original)
    load_grouter(directory)
    # A config that claims a wider score layer than the tensors hold.
    header["architecture"]["num_experts"] = header["num_experts"] = 13
    (directory / "config.json").write_text(json.dumps(header))
    assert "(12,) but its config implies torch.float32 (13,)" in refusal(directory)
    header["architecture"]["num_layers"] = 3
    (directory / "config.json").write_text(json.dumps(header))
    assert "missing tensors" in refusal(directory)


def test_refuses_invalid_architecture(tmp_path):
    _, directory = saved(tmp_path)
    header = json.loads((directory / "config.json").read_text())
    del header["config_sha256"]  # as saved before config checksums (unverified, still read)
    header["architecture"]["topk"] = 99
    (directory / "config.json").write_text(json.dumps(header))
    assert "invalid architecture" in refusal(directory)


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    model, directory = saved(tmp_path)
    before = grouter_fingerprint(directory)
    other = tiny_grouter(seed=7)
    broken_provenance = {**PROVENANCE, "note": object()}  # not JSON: fails after tensors are written
    with pytest.raises(UserError, match="not plain JSON"):
        save_grouter(other, directory, broken_provenance, TOKENIZER)
    assert grouter_fingerprint(directory) == before
    assert sorted(os.listdir(tmp_path)) == ["grouter"]
    loaded, _ = load_grouter(directory)
    ids_BS = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids_BS), model.logits(ids_BS))


def test_stale_staging_directory_is_ignored(tmp_path):
    model, directory = saved(tmp_path)
    stale = tmp_path / ".grouter.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    loaded, _ = load_grouter(directory)
    replacement = tiny_grouter(seed=3)
    save_grouter(replacement, directory, PROVENANCE, TOKENIZER)
    loaded, _ = load_grouter(directory)
    ids_BS = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids_BS), replacement.logits(ids_BS))
        assert not torch.equal(loaded.logits(ids_BS), model.logits(ids_BS))
    assert stale.exists() and sorted(os.listdir(tmp_path)) == [".grouter.tmp-deadbeef", "grouter"]


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a Grouter checkpoint"):
        save_grouter(tiny_grouter(), target, PROVENANCE, TOKENIZER)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_refuses_tokenizer_larger_than_embedding(tmp_path):
    with pytest.raises(UserError, match="vocab_size >= 200"):
        save_grouter(tiny_grouter(), tmp_path / "g", PROVENANCE, {"vocab_size": 200, "sha256": "x"})
    assert not any(tmp_path.iterdir())


def test_fingerprint_tracks_content(tmp_path):
    model, directory = saved(tmp_path)
    first = grouter_fingerprint(directory)
    assert first == grouter_fingerprint(directory) and len(first) == 64
    save_grouter(model, tmp_path / "copy", PROVENANCE, TOKENIZER)
    assert grouter_fingerprint(tmp_path / "copy") == first
    with torch.no_grad():
        model.expert_bias[0] = 0.5
    save_grouter(model, directory, PROVENANCE, TOKENIZER)
    assert grouter_fingerprint(directory) != first


@pytest.mark.parametrize("causal", [True, False])
def test_checkpoint_records_causal(tmp_path, causal):
    _, directory = saved(tmp_path, causal=causal)
    assert json.loads((directory / "config.json").read_text())["architecture"]["causal"] is causal
    loaded, info = load_grouter(directory)
    assert loaded.config.causal is causal and info.config.sees_future_tokens is not causal


def test_checkpoint_without_causal_field_loads_as_bidirectional(tmp_path, caplog):
    """Grouters saved before the flag existed had a bidirectional encoder: they stay one."""
    model, directory = saved(tmp_path, causal=False)
    header = json.loads((directory / "config.json").read_text())
    del header["config_sha256"]  # as saved before config checksums (unverified, still read)
    del header["architecture"]["causal"]
    (directory / "config.json").write_text(json.dumps(header))
    with caplog.at_level("INFO", logger="megatron_grouter"):
        loaded, _ = load_grouter(directory)
    assert loaded.config.causal is False and loaded.config.sees_future_tokens
    assert any("predates the causal flag" in record.getMessage() for record in caplog.records)
    ids_BS = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded.logits(ids_BS), model.logits(ids_BS))


def test_edited_config_is_refused_by_its_checksum(tmp_path, caplog):
    """A bidirectional Grouter relabelled causal would route on future tokens behind the guard."""
    model, directory = saved(tmp_path, causal=False)
    original = (directory / "config.json").read_text()
    header = json.loads(original)
    header["architecture"]["causal"] = True
    (directory / "config.json").write_text(json.dumps(header, indent=2))
    message = refusal(directory)
    assert "config.json that was edited after saving" in message and "config_sha256" in message
    (directory / "config.json").write_text(original)
    load_grouter(directory)  # the saved text, reformatted or not, verifies
    (directory / "config.json").write_text(json.dumps(json.loads(original)))
    load_grouter(directory)
    # A checkpoint from before the checksum: read with a warning, and `upgrade` adds the checksum.
    del header["config_sha256"]
    header["architecture"]["causal"] = False
    (directory / "config.json").write_text(json.dumps(header))
    with caplog.at_level("WARNING", logger="megatron_grouter"):
        load_grouter(directory)
    assert any("predates config checksums" in record.getMessage() for record in caplog.records)
    from megatron_grouter.grouter.checkpoint import main as checkpoint_main

    assert checkpoint_main(["upgrade", str(directory)]) == 0
    upgraded = json.loads((directory / "config.json").read_text())
    assert "config_sha256" in upgraded
    upgraded["architecture"]["causal"] = True
    (directory / "config.json").write_text(json.dumps(upgraded))
    assert "edited after saving" in refusal(directory)
