"""Megatron-LM's GPU defaults for megatron-core's fused kernels, decided from what is installed.

Megatron-LM's `arguments.py` turns these on unless told otherwise; megatron-core's
TransformerConfig leaves them off. Each needs CUDA and a kernel package:
  bias_dropout_fusion, masked_softmax_fusion   CUDA (megatron's jit-fused / softmax kernels)
  apply_rope_fusion                            Transformer Engine >= 1.4 (fused RoPE)
  persist_layer_norm                           Transformer Engine norms (the torch norm refuses it)
  moe_permute_fusion                           Transformer Engine >= 2.1 (fused permute: no
                                               masked_select, so no device→host sync per layer)
  gradient_accumulation_fusion                 apex's fused_weight_gradient_mlp_cuda: GPTModel's
                                               output layer is megatron's own ColumnParallelLinear
  deallocate_pipeline_outputs                  CUDA (frees pipeline-stage outputs after sending)
The answer is the same for every supported megatron-core release (read against 0.16.1 and
0.19.2: both check the same TE versions), so it depends on the device and the kernel packages only.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_grouter.megatron_compat import parse_version


@dataclass(frozen=True)
class KernelEnvironment:
    cuda: bool
    transformer_engine: str | None = None  # Transformer Engine's version, None when it does not import
    fused_wgrad: bool = False  # apex's fused_weight_gradient_mlp_cuda imports


def _te_at_least(environment: KernelEnvironment, version: str) -> bool:
    te = environment.transformer_engine
    return environment.cuda and te is not None and parse_version(te) >= parse_version(version)


def fusion_fields(environment: KernelEnvironment) -> dict[str, bool]:
    """TransformerConfig fields: on where their kernel runs, off elsewhere (always off on CPU)."""
    cuda = environment.cuda
    return dict(
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda,
        apply_rope_fusion=_te_at_least(environment, "1.4"),
        persist_layer_norm=_te_at_least(environment, "0"),
        moe_permute_fusion=_te_at_least(environment, "2.1"),
        gradient_accumulation_fusion=cuda and environment.fused_wgrad,
        deallocate_pipeline_outputs=cuda,
    )


def detect_kernels() -> KernelEnvironment:
    """This process's device and kernel packages."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    te_version = None
    if cuda:
        try:
            import transformer_engine
        except ImportError:
            transformer_engine = None
        if transformer_engine is not None:
            te_version = getattr(transformer_engine, "__version__", None) or "0"
    fused_wgrad = cuda and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    return KernelEnvironment(cuda=cuda, transformer_engine=te_version, fused_wgrad=fused_wgrad)
