"""Tiny randomly initialised Hugging Face MoE checkpoints, one per supported family (no download).

Every tensor (norm weights, biases, buffers included) is re-drawn at random before saving, so a
tensor that was skipped or mixed up during loading changes the router logits. Checkpoints are saved
in many small safetensors shards plus a tiny byte-level BPE tokenizer.json.
"""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen3MoeConfig,
)

VOCAB_SIZE = 320
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    tie_word_embeddings=False,
)
_DEEPSEEK_ATTENTION = dict(
    num_key_value_heads=4,  # multi-head latent attention wants as many kv heads as query heads
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def tiny_config(model_type: str) -> PretrainedConfig:
    """A few-layer, 8-expert top-2 config of `model_type` with a non-trivial dense/MoE layer pattern."""
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON, num_hidden_layers=5, head_dim=8, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, mlp_only_layers=[0, 2],
        )
    if model_type == "olmoe":
        return OlmoeConfig(**_COMMON, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2)
    if model_type == "mixtral":
        return MixtralConfig(**_COMMON, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2)
    if model_type == "deepseek_v3":
        return DeepseekV3Config(
            **{**_COMMON, **_DEEPSEEK_ATTENTION}, num_hidden_layers=5, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=2,
        )
    if model_type == "deepseek_v2":
        return DeepseekV2Config(
            **{**_COMMON, **_DEEPSEEK_ATTENTION}, num_hidden_layers=4, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        )
    if model_type == "gpt_oss":
        # A short sliding window makes the per-layer attention kinds (layer_types) matter for 10 tokens.
        return GptOssConfig(
            **_COMMON, num_hidden_layers=4, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=4,
        )
    if model_type in _EXTRA:
        return AutoConfig.for_model(model_type, **{**_COMMON, **_EXTRA[model_type]})
    raise ValueError(f"no tiny config for {model_type}")


_MOE8 = dict(moe_intermediate_size=16, num_experts_per_tok=2)
# Families added later, one registry entry each; each has a dense layer or an irregular MoE pattern
# where its config allows one, shared experts where it has them.
_EXTRA: dict[str, dict] = {
    "qwen2_moe": dict(num_hidden_layers=4, num_experts=8, shared_expert_intermediate_size=24,
                      mlp_only_layers=[1], **_MOE8),
    "qwen3_next": dict(num_hidden_layers=4, head_dim=8, num_experts=8, shared_expert_intermediate_size=24,
                       layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8, mlp_only_layers=[0], **_MOE8),
    "qwen3_5_moe_text": dict(num_hidden_layers=4, head_dim=8, num_experts=8, shared_expert_intermediate_size=24,
                             layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=4,
                             linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, **_MOE8),
    "glm4_moe": dict(num_hidden_layers=4, head_dim=8, n_routed_experts=8, n_group=2, topk_group=1,
                     n_shared_experts=1, first_k_dense_replace=1, **_MOE8),
    "dots1": dict(num_hidden_layers=4, head_dim=8, n_routed_experts=8, n_group=2, topk_group=1,
                  n_shared_experts=1, first_k_dense_replace=1, **_MOE8),
    "exaone_moe": dict(num_hidden_layers=4, head_dim=8, num_experts=8, n_group=2, topk_group=1,
                       num_shared_experts=1, first_k_dense_replace=1, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"] * 2,
                       mlp_layer_types=["dense", "sparse", "sparse", "sparse"], **_MOE8),
    "ernie4_5_moe": dict(num_hidden_layers=4, moe_num_experts=8, moe_k=2, moe_intermediate_size=16,
                         moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1),
    "llama4_text": dict(num_hidden_layers=4, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                        intermediate_size_mlp=48, interleave_moe_layer_step=2, attention_chunk_size=4,
                        no_rope_layers=[1, 1, 1, 0]),
    "granitemoe": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=24),
    "phimoe": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2),
    "flex_olmo": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2),
    "minimax": dict(num_hidden_layers=4, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
                    layer_types=["linear_attention", "full_attention"] * 2),
    "hunyuan_v1_moe": dict(num_hidden_layers=3, head_dim=8, num_experts=8, moe_topk=2, moe_intermediate_size=16),
    "cohere2_moe": dict(num_hidden_layers=3, head_dim=8, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=16),
}

FAMILY_TYPES = ("qwen3_moe", "olmoe", "mixtral", "deepseek_v3", "deepseek_v2", "gpt_oss", *_EXTRA)


def randomise_all_tensors(model: torch.nn.Module) -> None:
    """Draw every parameter and persistent buffer afresh (norm weights around 1, the rest around 0)."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary_emb" in name:
                continue
            if name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.3 * torch.randn_like(tensor))


def write_tiny_tokenizer(out_dir: str) -> None:
    """A byte-level BPE tokenizer.json trained on a few strings (a stand-in for the teacher's own)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(["the router sends each token to two experts"] * 8, trainer=trainer)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def make_tiny_checkpoint(
    model_type: str, out_dir: str, seed: int = 0, max_shard_size: str = "24KB", dtype: torch.dtype = torch.float32
) -> str:
    """Save a random tiny `model_type` MoE model to `out_dir` in several shards; returns `out_dir`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    randomise_all_tensors(model)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    write_tiny_tokenizer(out_dir)
    return out_dir


def load_full_model(model_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The whole checkpoint loaded the ordinary way (the reference the partial source must match)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).eval()
