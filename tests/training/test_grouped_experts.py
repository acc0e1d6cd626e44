"""Grouped-GEMM experts: initialised and exported as the same experts as the per-expert loop.

No grouped GEMM runs on this CPU (Transformer Engine's TEGroupedMLP needs TE; 0.16.x's legacy
GroupedMLP needs the grouped_gemm CUDA package and bf16; 0.18.0+'s local spec builds the loop), so
`model.grouped_gemm` resolves to the loop here and `true` is refused (test_config_errors). What must
hold anyway: a grouped model built from the same config and seed starts from the same experts, and
mg-export reads a grouped checkpoint's experts as the loop's. Checked on megatron's SequentialMLP
model (real, built here) against the grouped parameter layouts: TE's `linear_fc{1,2}.weight{i}`
and the legacy `weight1`/`weight2` (each local expert's transposed weight, one contiguous block).
"""

from __future__ import annotations

import pytest
import torch

from megatron_grouter.offline.export_hf import _expert_fc
from megatron_grouter.training.config import ModelConfig, ParallelConfig, RouterConfig
from megatron_grouter.training.init import global_parameter_name, is_expert_parameter, layout_invariant_init

MODEL = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, num_experts=4,
                    moe_ffn_hidden_size=16, topk=2, max_position_embeddings=64)
SEED, STD = 7, 0.02


@pytest.fixture(scope="module")
def loop_model():
    """megatron's GPTModel with SequentialMLP experts, initialised layout-invariantly."""
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed
    from megatron_grouter.training.model import build_gpt_model

    init_distributed(num_experts=MODEL.num_experts)
    model = build_gpt_model(MODEL, RouterConfig(), ParallelConfig(), vocab_size=128)
    assert not model.config.moe_grouped_gemm  # the loop on this machine
    layout_invariant_init(model, SEED, STD, MODEL.num_layers, MODEL.num_experts)
    yield model
    shutdown_distributed()


class _Layer(torch.nn.Module):
    def __init__(self, layer_number: int, experts: torch.nn.Module):
        super().__init__()
        self.layer_number = layer_number
        self.mlp = torch.nn.Module()
        self.mlp.experts = experts


class _Model(torch.nn.Module):
    """Only the expert parameters of a GPTModel, under grouped-GEMM names, as init walks them."""

    def __init__(self, config, experts_per_layer: list[torch.nn.Module]):
        super().__init__()
        self.config = config
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(_Layer(index + 1, experts)
                                                  for index, experts in enumerate(experts_per_layer))


def _te_grouped(hidden: int, ffn: int, experts: int) -> torch.nn.Module:
    module = torch.nn.Module()
    module.linear_fc1 = torch.nn.Module()
    module.linear_fc2 = torch.nn.Module()
    for index in range(experts):
        module.linear_fc1.register_parameter(f"weight{index}", torch.nn.Parameter(torch.zeros(2 * ffn, hidden)))
        module.linear_fc2.register_parameter(f"weight{index}", torch.nn.Parameter(torch.zeros(hidden, ffn)))
    return module


def _legacy_grouped(hidden: int, ffn: int, experts: int) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight1 = torch.nn.Parameter(torch.zeros(hidden, experts * 2 * ffn))
    module.weight2 = torch.nn.Parameter(torch.zeros(experts * ffn, hidden))
    return module


def _loop_expert(loop_model, layer: int, expert: int, which: str) -> torch.Tensor:
    return dict(loop_model.named_parameters())[f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{which}.weight"]


def test_grouped_names_map_to_the_loops_global_experts():
    name = "decoder.layers.1.mlp.experts.linear_fc2.weight3"
    assert global_parameter_name(name, 4, 1) == "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight"
    assert global_parameter_name(name, 4, 1, expert_of_slot=list(reversed(range(8)))) == \
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"
    assert is_expert_parameter(name) and is_expert_parameter("decoder.layers.0.mlp.experts.weight1")
    assert not is_expert_parameter("decoder.layers.0.mlp.shared_experts.linear_fc1.weight")


@pytest.mark.parametrize("layout", ["te", "legacy"])
def test_grouped_experts_start_as_the_loops_experts(loop_model, layout):
    hidden, ffn, experts = MODEL.hidden_size, MODEL.moe_ffn_hidden_size, MODEL.num_experts
    build = _te_grouped if layout == "te" else _legacy_grouped
    grouped = _Model(loop_model.config, [build(hidden, ffn, experts) for _ in range(MODEL.num_layers)])
    layout_invariant_init(grouped, SEED, STD, MODEL.num_layers, MODEL.num_experts)
    for layer in range(MODEL.num_layers):
        module = grouped.decoder.layers[layer].mlp.experts
        for expert in range(experts):
            if layout == "te":
                fc1, fc2 = getattr(module.linear_fc1, f"weight{expert}"), getattr(module.linear_fc2, f"weight{expert}")
            else:  # GroupedMLP.forward reads weight1 as [E, H, 2F] and weight2 as [E, F, H]
                fc1 = module.weight1.view(experts, hidden, -1)[expert].T
                fc2 = module.weight2.view(experts, -1, hidden)[expert].T
            torch.testing.assert_close(fc1, _loop_expert(loop_model, layer, expert, "linear_fc1"), rtol=0, atol=0)
            torch.testing.assert_close(fc2, _loop_expert(loop_model, layer, expert, "linear_fc2"), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["te", "legacy"])
def test_export_reads_grouped_experts_as_the_loops(loop_model, layout):
    state = loop_model.state_dict()
    experts = MODEL.num_experts
    grouped = {}
    for layer in range(MODEL.num_layers):
        prefix = f"decoder.layers.{layer}.mlp"
        fc1 = [state[f"{prefix}.experts.local_experts.{e}.linear_fc1.weight"] for e in range(experts)]
        fc2 = [state[f"{prefix}.experts.local_experts.{e}.linear_fc2.weight"] for e in range(experts)]
        if layout == "te":
            grouped.update({f"{prefix}.experts.linear_fc1.weight{e}": fc1[e] for e in range(experts)})
            grouped.update({f"{prefix}.experts.linear_fc2.weight{e}": fc2[e] for e in range(experts)})
        else:
            grouped[f"{prefix}.experts.weight1"] = torch.stack([w.T for w in fc1]).reshape(MODEL.hidden_size, -1)
            grouped[f"{prefix}.experts.weight2"] = torch.stack([w.T for w in fc2]).reshape(-1, MODEL.hidden_size)
        for expert in range(experts):
            for which in ("linear_fc1", "linear_fc2"):
                torch.testing.assert_close(_expert_fc(grouped, prefix, expert, which, experts),
                                           _expert_fc(state, prefix, expert, which, experts), rtol=0, atol=0)
