"""Builds megatron-core's GPTModel with MoE layers from our configs.

Layer specs: Transformer Engine's when it imports (GPU images), megatron-core's local spec
otherwise. Every MoE layer of the spec becomes our `PluginMoELayer` with the router the router
config names (routing/registry.py) in `MoESubmodules.router`, and, with
`parallel.dispatcher=planned`, our planned all-to-all dispatcher — megatron's own extension point
(the layer spec), read the way each supported release writes it (megatron_compat.py). After
the build, `check_plugin_layers` refuses a model in which any MoE layer escaped the spec.
"""

from __future__ import annotations

import functools

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grouter.dispatch.planned_dispatcher import PlannedAllToAllDispatcher
from megatron_grouter.megatron_compat import (building_plugin_layers, clear_aux_losses, plugin_moe_spec,
                                              replace_in_spec)
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.registry import router_kind
from megatron_grouter.runtime.cpu_compat import SequenceParallelRMSNorm
from megatron_grouter.training.config import ModelConfig, ParallelConfig, RouterConfig, expert_tensor_size
from megatron_grouter.training.fusions import detect_kernels, fusion_fields
from megatron_grouter.training.moe_layer import PluginMoELayer, check_plugin_layers


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_gemm_enabled(model: ModelConfig) -> bool:
    """model.grouped_gemm, or where unset: on where it runs (Transformer Engine's TEGroupedMLP).
    megatron-core's local spec has no grouped GEMM that runs without CUDA kernels: 0.16.x's legacy
    GroupedMLP needs the grouped_gemm package and bf16, 0.18.0+ builds the per-expert loop."""
    return transformer_engine_available() if model.grouped_gemm is None else model.grouped_gemm


def padded_vocab_size(tokenizer_vocab: int, multiple: int = 128) -> int:
    return -(-tokenizer_vocab // multiple) * multiple


def moe_layer_pattern(model: ModelConfig) -> list[int]:
    """1 for an MoE layer, 0 for a dense one (the first `first_dense_layers` are dense)."""
    return [0 if index < model.first_dense_layers else 1 for index in range(model.num_layers)]


def recompute_fields(recompute: str) -> dict:
    """train.recompute → megatron's activation-recomputation settings."""
    if recompute == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if recompute == "selective":
        return dict(recompute_granularity="selective")
    return {}


def transformer_config(model: ModelConfig, router: RouterConfig, parallel: ParallelConfig,
                       bf16: bool = False, recompute: str = "none") -> TransformerConfig:
    cuda = torch.cuda.is_available()
    fusions = fusion_fields(detect_kernels())
    mla_fields = {}
    config_class = TransformerConfig
    if model.multi_latent_attention:
        fusions["apply_rope_fusion"] = False  # megatron fuses MLA's RoPE for YaRN only
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class = MLATransformerConfig
        mla_fields = dict(q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
                          qk_head_dim=model.qk_head_dim, qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
                          v_head_dim=model.v_head_dim)
    return config_class(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        qk_layernorm=model.qk_layernorm,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.topk,
        moe_layer_freq=moe_layer_pattern(model),
        moe_shared_expert_intermediate_size=model.shared_expert_intermediate_size,
        # PluginMoELayer builds the planned dispatcher in place of allgather's (same expert layout).
        moe_token_dispatcher_type="allgather" if parallel.dispatcher == "planned" else parallel.dispatcher,
        moe_grouped_gemm=grouped_gemm_enabled(model),
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=expert_tensor_size(parallel),
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not cuda,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        **fusions,
        **mla_fields,
        **recompute_fields(recompute),
        **router_kind(router.type).config_fields(router),
    )


def layer_spec(config: TransformerConfig, router: RouterConfig, parallel: ParallelConfig,
               context: RoutingContext, vp_stage: int | None = None):
    """The decoder block spec of this pipeline stage (and virtual stage): megatron's, with our
    MoE layer, router and (planned) dispatcher in every MoE layer."""
    use_te = transformer_engine_available()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization="RMSNorm", vp_stage=vp_stage)
    if config.sequence_parallel and not use_te:
        # megatron's torch norm refuses sequence parallelism; ours marks its weight for the TP all-reduce
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        spec = replace_in_spec(spec, WrappedTorchNorm, SequenceParallelRMSNorm)
    router_builder = router_kind(router.type).builder(router, context)
    layer_kwargs = {}
    if parallel.dispatcher == "planned":
        layer_kwargs["dispatcher_builder"] = functools.partial(
            PlannedAllToAllDispatcher, context=context, verify=parallel.verify_dispatch_plan)
    for layer in spec.layer_specs:
        moe = plugin_moe_spec(layer.submodules.mlp, PluginMoELayer, router_builder, **layer_kwargs)
        if moe is not None:
            layer.submodules.mlp = moe
    return spec


def build_gpt_model(model: ModelConfig, router: RouterConfig, parallel: ParallelConfig,
                    vocab_size: int, bf16: bool = False, context: RoutingContext | None = None,
                    recompute: str = "none", vp_stage: int | None = None) -> GPTModel:
    """This rank's GPTModel (its pipeline stage, or one virtual stage of it), whose preemptive
    routers and planned dispatchers read each micro-batch's routing from `context`."""
    config = transformer_config(model, router, parallel, bf16=bf16, recompute=recompute)
    context = context or RoutingContext(sequence_parallel=parallel.sequence_parallel)
    virtual = parallel.virtual_pipeline is not None
    with building_plugin_layers():
        gpt_model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, router, parallel, context, vp_stage),
            vocab_size=vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not model.untie_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            vp_stage=vp_stage,
        )
    check_plugin_layers(gpt_model, PlannedAllToAllDispatcher if parallel.dispatcher == "planned" else None)
    # megatron's aux-loss tracker is process-global and sized by the model that first records;
    # a new model starts with an empty one
    clear_aux_losses(new_model=True)
    return gpt_model


def build_model_chunks(model: ModelConfig, router: RouterConfig, parallel: ParallelConfig,
                       vocab_size: int, **kwargs) -> list[GPTModel]:
    """One GPTModel per virtual pipeline stage of this rank (one chunk without interleaving)."""
    if parallel.virtual_pipeline is None:
        return [build_gpt_model(model, router, parallel, vocab_size, **kwargs)]
    return [build_gpt_model(model, router, parallel, vocab_size, vp_stage=stage, **kwargs)
            for stage in range(parallel.virtual_pipeline)]


def moe_layers(gpt_model: torch.nn.Module | list) -> list[MoELayer]:
    """This rank's MoE layers, in model order (over all chunks when given a list)."""
    chunks = gpt_model if isinstance(gpt_model, (list, tuple)) else [gpt_model]
    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, MoELayer)]


def global_moe_index(layer: MoELayer, pattern: list[int]) -> int:
    """The index of an MoE layer among all MoE layers of the whole model (every stage)."""
    return sum(pattern[:layer.layer_number - 1])
