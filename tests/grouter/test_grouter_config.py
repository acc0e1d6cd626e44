"""GrouterConfig validation and round trip; parameter counts of built Grouters."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter import Grouter, GrouterConfig, count_parameters

from tests.grouter.grouter_fixtures import tiny_config

QWEN3_VOCAB = 151_936


def test_to_dict_from_dict_round_trip_through_json():
    config = tiny_config(encoder="residual_linear", score_function="sigmoid", scaling_factor=2.5,
                         use_positions=False, dtype="bfloat16")
    restored = GrouterConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.ffn_hidden_size == config.ffn_hidden_size > 0


def test_default_ffn_size_is_resolved_and_explicit():
    config = GrouterConfig(vocab_size=10, num_experts=4, topk=1)
    assert config.ffn_hidden_size == 1536
    assert config.to_dict()["ffn_hidden_size"] == 1536
    assert GrouterConfig(vocab_size=10, num_experts=4, topk=1, ffn_hidden_size=100).ffn_hidden_size == 100


@pytest.mark.parametrize("overrides, words", [
    (dict(topk=13), "topk=13 exceeds num_experts=12"),
    (dict(hidden_size=30, num_heads=4), "not divisible"),
    (dict(encoder="mla"), "encoder='mla'"),
    (dict(score_function="relu"), "score_function"),
    (dict(dtype="float16"), "dtype"),
    (dict(num_experts=0), "num_experts"),
    (dict(vocab_size=True), "vocab_size"),
    (dict(use_positions=1), "use_positions"),
    (dict(causal="yes"), "causal"),
    (dict(scaling_factor=float("nan")), "scaling_factor"),
    (dict(hidden_size=36, num_heads=4), "odd"),
])
def test_invalid_configs_are_refused_in_one_line(overrides, words):
    with pytest.raises(UserError, match=words) as caught:
        tiny_config(**overrides)
    assert "\n" not in str(caught.value)


def test_odd_head_size_is_fine_without_positions():
    assert tiny_config(hidden_size=36, num_heads=4, use_positions=False).head_dim == 9


def test_from_dict_refuses_unknown_and_missing_keys():
    values = tiny_config().to_dict()
    with pytest.raises(UserError, match="unknown Grouter config keys \\['heads'\\]"):
        GrouterConfig.from_dict({**values, "heads": 8})
    del values["num_experts"]
    with pytest.raises(UserError, match="num_experts"):
        GrouterConfig.from_dict(values)


@pytest.mark.parametrize("encoder", ["mha", "residual_linear"])
@pytest.mark.parametrize("score_bias", [True, False])
def test_count_parameters_matches_a_built_model(encoder, score_bias):
    config = tiny_config(encoder=encoder, score_bias=score_bias)
    model = Grouter(config)
    counts = count_parameters(config)
    assert counts["total"] == model.num_parameters()
    assert counts["embedding"] == model.embedding.weight.numel()
    assert counts["score"] == sum(p.numel() for p in model.score.parameters())


def test_paper_default_size():
    """3 layers, hidden 512, 8 heads, Qwen3 vocabulary: the encoder is the paper's ~10M.

    The paper reports 60M parameters of which 50M are the embedding; with hidden 512 and the
    151,936-token Qwen3 vocabulary the embedding alone is V*H = 77.8M, so the total here is ~88M.
    What carries over is the ~10M of non-embedding parameters (60M - 50M).
    """
    config = GrouterConfig(vocab_size=QWEN3_VOCAB, num_experts=128, topk=8)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.encoder) == (512, 3, 8, "mha")
    with torch.device("meta"):
        model = Grouter(config)
    total = model.num_parameters()
    embedding = model.embedding.weight.numel()
    assert total == count_parameters(config)["total"]
    assert embedding == QWEN3_VOCAB * 512
    assert 9e6 <= total - embedding <= 11e6
    assert embedding / total > 0.85
