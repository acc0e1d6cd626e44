"""Can this run resume from that checkpoint? Its recorded shape against the run's, before loading.

A checkpoint records the run that wrote it (train_state.json: "config", "vocab_size", the
parallel sizes). A run of another shape (more experts, a wider model, another tensor/pipeline/
expert split: the optimizer state reshards over data parallelism only) would fail deep inside
megatron's loader with a shape-mismatch traceback; `check_resume_compatible` names the fields that
differ in one line first.
"""

from __future__ import annotations

from pathlib import Path

from megatron_grouter.errors import UserError

# ModelConfig fields that decide parameter shapes or the set of parameters.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                "ffn_hidden_size", "num_experts", "moe_ffn_hidden_size", "first_dense_layers",
                "shared_expert_intermediate_size", "untie_embeddings", "qk_layernorm",
                "multi_latent_attention", "kv_lora_rank", "q_lora_rank", "qk_head_dim",
                "qk_pos_emb_head_dim", "v_head_dim")
# Parallel sizes the checkpoint cannot be resharded over (its optimizer state is dp_reshardable).
LAYOUT_FIELDS = ("tensor_parallel", "pipeline_parallel", "expert_parallel")
PARALLEL_FIELDS = ("virtual_pipeline", "expert_tensor")  # (config.parallel; None: the default)


def _effective(parallel: dict, name: str):
    """The value a run uses: an unset expert_tensor is the tensor-parallel size (and an unset
    virtual_pipeline no interleaving), so unset and its default compare equal."""
    value = parallel.get(name)
    if name == "expert_tensor" and value is None:
        return parallel.get("tensor", 1)
    return value


def shape_differences(saved: dict, current: dict) -> list[str]:
    """`field saved→current` for every shape field that differs (fields one side lacks are skipped:
    a checkpoint from before the field existed)."""
    differences = []
    saved_model = (saved.get("config") or {}).get("model") or {}
    current_model = (current.get("config") or {}).get("model") or {}
    for name in SHAPE_FIELDS:
        if name in saved_model and name in current_model and saved_model[name] != current_model[name]:
            differences.append(f"model.{name} {saved_model[name]}→{current_model[name]}")
    if "vocab_size" in saved and "vocab_size" in current and saved["vocab_size"] != current["vocab_size"]:
        differences.append(f"vocab_size {saved['vocab_size']}→{current['vocab_size']}")
    for name in LAYOUT_FIELDS:
        if name in saved and name in current and saved[name] != current[name]:
            differences.append(f"{name} {saved[name]}→{current[name]}")
    saved_parallel = (saved.get("config") or {}).get("parallel") or {}
    current_parallel = (current.get("config") or {}).get("parallel") or {}
    for name in PARALLEL_FIELDS:
        if name in saved_parallel and name in current_parallel:
            before, after = _effective(saved_parallel, name), _effective(current_parallel, name)
            if before != after:
                differences.append(f"parallel.{name} {before}→{after}")
    return differences


def check_resume_compatible(path: Path, saved: dict, current: dict | None) -> None:
    """Refuse (one line) to resume a run whose model or non-reshardable layout differs from the
    checkpoint's; `current` is the resuming run's train state (None: nothing to compare)."""
    if current is None:
        return
    differences = shape_differences(saved, current)
    if differences:
        raise UserError(f"cannot resume from {path}: it was saved by a run of another shape "
                        f"({', '.join(differences)}); resume with the checkpoint's settings, or start a "
                        "new run (train.resume=none or another train.out_dir)")
