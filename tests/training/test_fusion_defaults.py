"""Megatron-LM's fused-kernel defaults: on where their kernels exist (CUDA + the package), off on CPU."""

import pytest

from megatron_grouter.training.fusions import KernelEnvironment, detect_kernels, fusion_fields

FIELDS = ("bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion", "persist_layer_norm",
          "moe_permute_fusion", "gradient_accumulation_fusion", "deallocate_pipeline_outputs")


def test_cpu_turns_every_fusion_off_even_with_packages():
    for environment in (KernelEnvironment(cuda=False),
                        KernelEnvironment(cuda=False, transformer_engine="2.8.0", fused_wgrad=True)):
        assert fusion_fields(environment) == dict.fromkeys(FIELDS, False)


def test_gpu_with_transformer_engine_and_apex_turns_every_fusion_on():
    environment = KernelEnvironment(cuda=True, transformer_engine="2.8.0+cu12", fused_wgrad=True)
    assert fusion_fields(environment) == dict.fromkeys(FIELDS, True)


@pytest.mark.parametrize("te, fused_wgrad, off", [
    (None, False, {"apply_rope_fusion", "persist_layer_norm", "moe_permute_fusion", "gradient_accumulation_fusion"}),
    ("2.0.0", False, {"moe_permute_fusion", "gradient_accumulation_fusion"}),  # fused permute: TE ≥ 2.1
    ("1.3", True, {"apply_rope_fusion", "moe_permute_fusion"}),  # fused RoPE: TE ≥ 1.4
])
def test_gpu_fusions_follow_their_packages(te, fused_wgrad, off):
    fields = fusion_fields(KernelEnvironment(cuda=True, transformer_engine=te, fused_wgrad=fused_wgrad))
    assert {name for name, on in fields.items() if not on} == off


def test_this_machine_builds_megatrons_config_with_its_answer():
    """The fields are TransformerConfig's (a typo would fail to build) and carry this machine's answer."""
    from megatron_grouter.training.config import ModelConfig, ParallelConfig, RouterConfig
    from megatron_grouter.training.model import transformer_config

    config = transformer_config(ModelConfig(), RouterConfig(), ParallelConfig())
    expected = fusion_fields(detect_kernels())
    assert {name: getattr(config, name) for name in FIELDS} == expected
    if not detect_kernels().cuda:
        assert not any(expected.values())
