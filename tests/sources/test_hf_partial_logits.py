"""The partially loaded teacher gives the same router logits as the full Hugging Face model."""

from __future__ import annotations

import pytest
import torch
from tests.sources.hf_tiny_checkpoints import FAMILY_TYPES, VOCAB_SIZE, load_full_model, make_tiny_checkpoint

from megatron_grouter.offline.sources import HFPartialSource, TeacherSource

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_moe")
    return {name: make_tiny_checkpoint(name, str(root / name), seed=i) for i, name in enumerate(FAMILY_TYPES)}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    input_ids_BS = torch.randint(3, VOCAB_SIZE, (3, 10), generator=generator)
    attention_mask_BS = torch.ones_like(input_ids_BS)
    attention_mask_BS[1, 6:] = 0  # right padding
    attention_mask_BS[2, 3:] = 0
    return input_ids_BS, attention_mask_BS


def _full_model_router_logits(model, input_ids_BS, attention_mask_BS, moe_position: int) -> torch.Tensor:
    """Router logits the full model reports for its `moe_position`-th MoE layer, [B, S, E] float32."""
    with torch.no_grad():
        output = model(input_ids=input_ids_BS, attention_mask=attention_mask_BS, output_router_logits=True)
    batch, seq = input_ids_BS.shape
    return output.router_logits[moe_position].float().reshape(batch, seq, -1)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_partial_logits_match_full_model_on_every_moe_layer(checkpoints, model_type):
    model_dir = checkpoints[model_type]
    full = load_full_model(model_dir)
    input_ids_BS, attention_mask_BS = _batch()

    first = HFPartialSource(model_dir, routing_target="raw")
    moe_layers = first.description["moe_layers"]
    assert isinstance(first, TeacherSource)
    assert first.moe_layer == moe_layers[0]
    assert len(moe_layers) >= 2
    for position, layer in enumerate(moe_layers):
        source = (first if layer == first.moe_layer
                  else HFPartialSource(model_dir, moe_layer=layer, routing_target="raw"))
        logits_BSE = source.router_logits(input_ids_BS, attention_mask_BS)
        expected_BSE = _full_model_router_logits(full, input_ids_BS, attention_mask_BS, position)
        assert logits_BSE.dtype == torch.float32
        assert logits_BSE.shape == (3, 10, source.num_experts)
        torch.testing.assert_close(logits_BSE, expected_BSE, rtol=1e-5, atol=1e-5)
        assert expected_BSE.std() > 0.1  # random weights give spread-out logits, so the match means something


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_layers_give_different_logits_and_padding_does_not_leak_backwards(checkpoints, model_type):
    model_dir = checkpoints[model_type]
    input_ids_BS, attention_mask_BS = _batch()
    source = HFPartialSource(model_dir)
    later = HFPartialSource(model_dir, moe_layer=source.description["moe_layers"][-1])
    first_BSE = source.router_logits(input_ids_BS, attention_mask_BS)
    assert not torch.allclose(first_BSE, later.router_logits(input_ids_BS, attention_mask_BS), atol=1e-3)

    # Causal attention: the real tokens of a padded row see the same context as the unpadded prefix.
    prefix_BSE = source.router_logits(input_ids_BS[1:2, :6])
    torch.testing.assert_close(first_BSE[1:2, :6], prefix_BSE, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])  # bf16 router vs DeepSeek's fp32 router
def test_bfloat16_weights_match_full_bfloat16_model(tmp_path, model_type):
    model_dir = make_tiny_checkpoint(model_type, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    input_ids_BS, attention_mask_BS = _batch()
    source = HFPartialSource(model_dir, dtype=torch.bfloat16, routing_target="raw")
    full = load_full_model(model_dir, dtype=torch.bfloat16)
    logits_BSE = source.router_logits(input_ids_BS, attention_mask_BS)
    assert logits_BSE.dtype == torch.float32
    torch.testing.assert_close(logits_BSE, _full_model_router_logits(full, input_ids_BS, attention_mask_BS, 0))

    # Loading the bf16 files in fp32 upcasts them; the logits then differ from bf16 only by rounding.
    upcast = HFPartialSource(model_dir, dtype=torch.float32, routing_target="raw")
    upcast_BSE = upcast.router_logits(input_ids_BS, attention_mask_BS)
    torch.testing.assert_close(upcast_BSE, logits_BSE, rtol=0.1, atol=0.1)


def test_interface_fields_describe_the_teacher(checkpoints):
    model_dir = checkpoints["deepseek_v3"]
    source = HFPartialSource(model_dir)
    assert (source.num_experts, source.topk, source.vocab_size) == (8, 2, VOCAB_SIZE)
    assert source.tokenizer_dir == model_dir
    assert source.description["model_type"] == "deepseek_v3"
    assert source.description["moe_layer"] == 2  # first_k_dense_replace=2
    assert source.description["score_function"] == "sigmoid"
    assert source.description["model_dir"] == model_dir
