"""Analytic parameter count of the GPTModel that `build_gpt_model` makes from a ModelConfig.

Counts what megatron-core allocates for our choices (RMSNorm, SwiGLU, no linear bias, rotary
positions, unfused per-expert MLPs), group by group, without building anything, so presets the
size of the paper's models can be checked on a laptop. Parameter counts do not depend on the
layer spec: Transformer Engine fuses some norms into the following linear layer but keeps their
weights. Counts are for the whole model (tensor/expert/pipeline parallel size 1).
"""

from __future__ import annotations

from megatron_grouter.errors import UserError
from megatron_grouter.training.config import ModelConfig


def _attention_parameters(model: ModelConfig) -> int:
    """Query/key/value and output projections plus q/k norms of one standard attention layer."""
    hidden = model.hidden_size
    heads = model.num_attention_heads
    # megatron-core's default head dimension floors hidden / heads (no divisibility check).
    head_dim = model.kv_channels if model.kv_channels is not None else hidden // heads
    groups = model.num_query_groups if model.num_query_groups is not None else heads
    if heads % groups:
        raise UserError(f"model.num_attention_heads={heads} is not divisible by "
                        f"model.num_query_groups={groups}")
    query_width = heads * head_dim
    key_value_width = 2 * groups * head_dim
    qkv = hidden * (query_width + key_value_width)
    output = query_width * hidden
    qk_norms = 2 * head_dim if model.qk_layernorm else 0
    return qkv + output + qk_norms


def _mla_parameters(model: ModelConfig) -> int:
    """Multi-latent attention (DeepSeek-V2) of one layer, as megatron's MLASelfAttention builds it."""
    hidden = model.hidden_size
    heads = model.num_attention_heads
    query_head_dim = model.qk_head_dim + model.qk_pos_emb_head_dim
    if model.q_lora_rank is None:
        query = hidden * heads * query_head_dim
    else:
        query_norm = model.q_lora_rank if model.qk_layernorm else 0
        query = hidden * model.q_lora_rank + query_norm + model.q_lora_rank * heads * query_head_dim
    # The compressed key/value latent plus the shared rotary key part.
    kv_down = hidden * (model.kv_lora_rank + model.qk_pos_emb_head_dim)
    kv_norm = model.kv_lora_rank if model.qk_layernorm else 0
    kv_up = model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim)
    output = heads * model.v_head_dim * hidden
    return query + kv_down + kv_norm + kv_up + output


def _swiglu_parameters(hidden: int, ffn: int) -> int:
    """fc1 (gate and up, 2·ffn × hidden) plus fc2 (hidden × ffn)."""
    return 3 * hidden * ffn


def count_parameters(model_cfg: ModelConfig, vocab_size: int,
                     trainable_router: bool = True) -> dict[str, int]:
    """Parameters of `build_gpt_model(model_cfg, ..., vocab_size)` by group, and their total.

    `vocab_size` is the (padded) vocabulary the model is built with. `trainable_router=False`
    leaves out the gate weights, for routers that have none (router.type=grouter_fixed).
    Keys: total, experts (routed experts), embedding (input and, if untied, output),
    attention (q/k and MLA latent norms included), dense_mlp (the first_dense_layers),
    shared_experts, router (gate weights), norms (two RMSNorms per layer and the final one).
    """
    model = model_cfg
    if vocab_size < 1:
        raise UserError(f"vocab_size={vocab_size} must be positive")
    if not 0 <= model.first_dense_layers < model.num_layers:
        raise UserError(f"model.first_dense_layers={model.first_dense_layers} must be within "
                        f"0..model.num_layers-1={model.num_layers - 1}")
    hidden = model.hidden_size
    moe_layers = model.num_layers - model.first_dense_layers

    embedding_tables = 2 if model.untie_embeddings else 1
    embedding = embedding_tables * vocab_size * hidden
    per_layer_attention = _mla_parameters(model) if model.multi_latent_attention \
        else _attention_parameters(model)
    attention = model.num_layers * per_layer_attention
    dense_mlp = model.first_dense_layers * _swiglu_parameters(hidden, model.ffn_hidden_size)
    experts = moe_layers * model.num_experts * _swiglu_parameters(hidden, model.moe_ffn_hidden_size)
    shared_width = model.shared_expert_intermediate_size or 0
    shared_experts = moe_layers * _swiglu_parameters(hidden, shared_width)
    router = moe_layers * model.num_experts * hidden if trainable_router else 0
    # input_layernorm and pre_mlp_layernorm of every layer, then the final norm.
    norms = (2 * model.num_layers + 1) * hidden

    counts = dict(experts=experts, embedding=embedding, attention=attention, dense_mlp=dense_mlp,
                  shared_experts=shared_experts, router=router, norms=norms)
    return dict(total=sum(counts.values()), **counts)


def moe_block_parameters(counts: dict[str, int]) -> int:
    """Everything inside the MoE layers' MLP (routed and shared experts plus routers).

    This is what the paper's Table 3 calls "expert parameters": its ratios match this sum.
    """
    return counts["experts"] + counts["shared_experts"] + counts["router"]
