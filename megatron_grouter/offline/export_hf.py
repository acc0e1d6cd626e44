"""mg-export: an mg-train checkpoint as a Hugging Face `transformers` MoE model directory.

    mg-export outputs/run out/hf-model                 # newest complete checkpoint of the run
    mg-export outputs/run/checkpoints/step_0000300 out/hf-model --dtype bfloat16

Why these layouts: our GPTModel is RMSNorm, SwiGLU, bias-free, RoPE (rotate-half), optionally
q/k RMSNorm, dense first layers and shared experts. Qwen3-MoE (`qwen3_moe`) is exactly that with
q/k norm and without shared experts; Qwen2-MoE (`qwen2_moe`, qkv_bias off) is that without q/k
norm, with a shared expert behind a sigmoid gate (exported with a zero gate, sigmoid(0) = 1/2, and
its down projection doubled, which is exact in binary floating point). A model neither layout can
express (sigmoid scores, an expert-selection bias, top-k scaling, MLA, q/k norm with shared
experts) is refused in one line rather than exported wrong.

A Grouter-routed target has no router weights: its experts are trained for the Grouter's choice.
It is exported with zero gates, the Grouter directory copied beside the weights, and a README
saying how to route it (`megatron_grouter.offline.hf_grouter_routing.attach_grouter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_grouter.app import command_status
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")
LAYOUTS = ("auto", "qwen3_moe", "qwen2_moe")
ROUTED_BY_GROUTER = ("grouter_fixed", "grouter_hybrid")
README = "README.md"


def _refuse_unsupported(root, layout: str) -> None:
    model, router = root.model, root.router
    if model.multi_latent_attention:
        raise UserError("model.multi_latent_attention=true has no Qwen-MoE layout; export supports "
                        "standard (GQA) attention only")
    if router.type in ROUTED_BY_GROUTER:
        if router.grouter.plan:
            raise UserError(f"router.grouter.plan={router.grouter.plan}: an EP placement permutes expert slots; "
                            "export a run trained without a plan")
        if router.type == "grouter_hybrid" and router.topk_scaling_factor not in (None, 1, 1.0):
            raise UserError(f"router.topk_scaling_factor={router.topk_scaling_factor} is not reproduced by "
                            "attach_grouter; cannot export exactly")
        if layout == "qwen3_moe" and model.shared_expert_intermediate_size:
            raise UserError("Qwen3-MoE has no shared experts and Qwen2-MoE no q/k norm: a model with both "
                            "cannot be exported")
        return
    if router.type != "topk":
        raise UserError(f"router.type={router.type} has no transformers equivalent; export supports the "
                        "learned topk router and Grouter-routed targets")
    if router.score_function != "softmax":
        raise UserError(f"router.score_function={router.score_function}: Qwen-MoE routers use softmax; "
                        "retrain with router.score_function=softmax to export")
    if router.enable_expert_bias:
        raise UserError("router.enable_expert_bias=true: transformers' Qwen-MoE routers have no selection "
                        "bias; this target cannot be exported exactly")
    if router.topk_scaling_factor not in (None, 1, 1.0):
        raise UserError(f"router.topk_scaling_factor={router.topk_scaling_factor}: Qwen-MoE routers do not "
                        "scale gate weights; cannot export exactly")
    if layout == "qwen3_moe" and not model.qk_layernorm:
        raise UserError("layout qwen3_moe always applies q/k RMSNorm but this model has qk_layernorm=false; "
                        "use --layout qwen2_moe (or auto)")
    if layout == "qwen2_moe" and model.qk_layernorm:
        raise UserError("layout qwen2_moe has no q/k RMSNorm but this model has qk_layernorm=true; "
                        "use --layout qwen3_moe (or auto)")
    if layout == "qwen3_moe" and model.shared_expert_intermediate_size:
        raise UserError("Qwen3-MoE has no shared experts and Qwen2-MoE no q/k norm: a model with both "
                        "cannot be exported")


def choose_layout(root, requested: str) -> str:
    if requested not in LAYOUTS:
        raise UserError(f"--layout {requested!r} is unknown; choose {', '.join(LAYOUTS)}")
    layout = requested
    if requested == "auto":
        layout = "qwen3_moe" if root.model.qk_layernorm else "qwen2_moe"
    _refuse_unsupported(root, layout)
    return layout


def hf_config(root, layout: str, vocab_size: int, megatron_config):
    from transformers import Qwen2MoeConfig, Qwen3MoeConfig

    model = root.model
    heads = model.num_attention_heads
    head_dim = megatron_config.kv_channels
    common = dict(
        vocab_size=vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads, head_dim=head_dim,
        max_position_embeddings=model.max_position_embeddings, rms_norm_eps=megatron_config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        tie_word_embeddings=not model.untie_embeddings, moe_intermediate_size=model.moe_ffn_hidden_size,
        num_experts=model.num_experts, num_experts_per_tok=model.topk, decoder_sparse_step=1,
        mlp_only_layers=list(range(model.first_dense_layers)), attention_bias=False,
        # megatron: softmax over the top-k logits = softmax over all, top-k, renormalised;
        # pre_softmax: softmax over all experts, top-k, not renormalised.
        norm_topk_prob=not root.router.pre_softmax, output_router_logits=False,
        router_aux_loss_coef=float(root.router.aux_loss_coeff or 0.0), use_cache=True,
        architectures=["Qwen3MoeForCausalLM" if layout == "qwen3_moe" else "Qwen2MoeForCausalLM"],
    )
    if layout == "qwen3_moe":
        return Qwen3MoeConfig(**common)
    return Qwen2MoeConfig(**common, qkv_bias=False, use_sliding_window=False,
                          shared_expert_intermediate_size=model.shared_expert_intermediate_size or 1)


def _pick(state: dict, *names: str) -> torch.Tensor:
    for name in names:
        if name in state:
            return state[name]
    raise UserError(f"checkpoint has none of {names}; export knows megatron-core's local and TE layer "
                    "names only")


def _split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's fused [groups * (q_per_group + 2) * head_dim, hidden] → q, k, v row blocks."""
    per_group = heads // groups
    grouped = qkv.view(groups, (per_group + 2) * head_dim, -1)
    q = grouped[:, : per_group * head_dim].reshape(heads * head_dim, -1)
    k = grouped[:, per_group * head_dim: (per_group + 1) * head_dim].reshape(groups * head_dim, -1)
    v = grouped[:, (per_group + 1) * head_dim:].reshape(groups * head_dim, -1)
    return q, k, v


def _expert_fc(state: dict, prefix: str, expert: int, which: str, num_experts: int) -> torch.Tensor:
    """Expert `expert`'s fc1/fc2 weight ([out, in]) under any of megatron's expert layouts:
    SequentialMLP's `local_experts.{e}.linear_fc1.weight`, Transformer Engine's grouped
    `linear_fc1.weight{e}`, or the legacy GroupedMLP's `weight1`/`weight2`, which hold every
    expert's transposed weight as one contiguous block each (read as [E, H, ·] / [E, ·, H])."""
    names = (f"{prefix}.experts.local_experts.{expert}.{which}.weight", f"{prefix}.experts.{which}.weight{expert}")
    legacy = state.get(f"{prefix}.experts.weight{which[-1]}")
    if legacy is not None and not any(name in state for name in names):
        if which == "linear_fc1":
            return legacy.reshape(num_experts, legacy.shape[0], -1)[expert].T
        return legacy.reshape(num_experts, -1, legacy.shape[1])[expert].T
    return _pick(state, *names)


def hf_state_dict(state: dict, root, layout: str, megatron_config, grouter_routed: bool) -> dict:
    """Our GPTModel's tensors under transformers' module names (per-expert gate/up/down)."""
    model = root.model
    heads, head_dim = model.num_attention_heads, megatron_config.kv_channels
    groups = model.num_query_groups or heads
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if model.untie_embeddings:
        out["lm_head.weight"] = state["output_layer.weight"]
    for index in range(model.num_layers):
        src, dst = f"decoder.layers.{index}", f"model.layers.{index}"
        out[f"{dst}.input_layernorm.weight"] = _pick(
            state, f"{src}.input_layernorm.weight", f"{src}.self_attention.linear_qkv.layer_norm_weight")
        q, k, v = _split_qkv(state[f"{src}.self_attention.linear_qkv.weight"], heads, groups, head_dim)
        out.update({f"{dst}.self_attn.q_proj.weight": q, f"{dst}.self_attn.k_proj.weight": k,
                    f"{dst}.self_attn.v_proj.weight": v,
                    f"{dst}.self_attn.o_proj.weight": state[f"{src}.self_attention.linear_proj.weight"]})
        if model.qk_layernorm:
            out[f"{dst}.self_attn.q_norm.weight"] = state[f"{src}.self_attention.q_layernorm.weight"]
            out[f"{dst}.self_attn.k_norm.weight"] = state[f"{src}.self_attention.k_layernorm.weight"]
        mlp = f"{src}.mlp"
        if index < model.first_dense_layers:
            out[f"{dst}.post_attention_layernorm.weight"] = _pick(
                state, f"{src}.pre_mlp_layernorm.weight", f"{mlp}.linear_fc1.layer_norm_weight")
            gate, up = state[f"{mlp}.linear_fc1.weight"].chunk(2, dim=0)
            out.update({f"{dst}.mlp.gate_proj.weight": gate, f"{dst}.mlp.up_proj.weight": up,
                        f"{dst}.mlp.down_proj.weight": state[f"{mlp}.linear_fc2.weight"]})
            continue
        out[f"{dst}.post_attention_layernorm.weight"] = state[f"{src}.pre_mlp_layernorm.weight"]
        router = state.get(f"{mlp}.router.weight")
        if router is None and not grouter_routed:
            raise UserError(f"layer {index} of the checkpoint has no router weights; is it Grouter-routed?")
        out[f"{dst}.mlp.gate.weight"] = (torch.zeros(model.num_experts, model.hidden_size)
                                         if router is None else router)
        for expert in range(model.num_experts):
            gate, up = _expert_fc(state, mlp, expert, "linear_fc1", model.num_experts).chunk(2, dim=0)
            out.update({f"{dst}.mlp.experts.{expert}.gate_proj.weight": gate,
                        f"{dst}.mlp.experts.{expert}.up_proj.weight": up,
                        f"{dst}.mlp.experts.{expert}.down_proj.weight":
                            _expert_fc(state, mlp, expert, "linear_fc2", model.num_experts)})
        if layout == "qwen2_moe":
            shared = f"{mlp}.shared_experts"
            if model.shared_expert_intermediate_size:
                gate, up = state[f"{shared}.linear_fc1.weight"].chunk(2, dim=0)
                down = 2.0 * state[f"{shared}.linear_fc2.weight"]  # undoes sigmoid(0) = 1/2 exactly
            else:  # no shared expert: a 1-wide one that adds exactly zero
                gate, up = torch.zeros(1, model.hidden_size), torch.zeros(1, model.hidden_size)
                down = torch.zeros(model.hidden_size, 1)
            out.update({f"{dst}.mlp.shared_expert.gate_proj.weight": gate,
                        f"{dst}.mlp.shared_expert.up_proj.weight": up,
                        f"{dst}.mlp.shared_expert.down_proj.weight": down,
                        f"{dst}.mlp.shared_expert_gate.weight": torch.zeros(1, model.hidden_size)})
    return {name: tensor.detach().clone().contiguous() for name, tensor in out.items()}  # no shared storage


def _load_into_hf(config, tensors: dict, dtype: torch.dtype):
    """A transformers model built from `config` holding `tensors` (its own per-expert conversion)."""
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_config = LoadStateDictConfig(dtype=torch.float32, dtype_plan=model._get_dtype_plan(torch.float32),
                                      weight_mapping=get_model_conversion_mapping(model))
    info, _ = convert_and_load_state_dict_in_model(model=model, state_dict=dict(tensors), load_config=load_config)
    missing = {name for name in info.missing_keys if not name.endswith("lm_head.weight")}
    if missing or info.unexpected_keys or info.mismatched_keys:
        raise RuntimeError(f"export mapping is incomplete: missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(info.unexpected_keys)[:3]}, mismatched {sorted(info.mismatched_keys)[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


def _readme(layout: str, root, grouter_dir: str | None, checkpoint: Path) -> str:
    lines = [f"# {root.model.name} exported from {checkpoint}", "",
             f"transformers `{layout}` layout, written by `mg-export` (megatron-grouter).", "",
             "```python", "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained('<this directory>')"]
    if grouter_dir is None:
        lines += ["```", "", "The learned routers are exported as the `gate` weights: this model routes "
                  "itself; its logits equal the megatron checkpoint's."]
    else:
        gates = ("ZERO placeholders (grouter_fixed: the Grouter gives the weights too)"
                 if root.router.type == "grouter_fixed" else
                 "the layer's trained gate, used only to weigh the experts the Grouter chose (grouter_hybrid)")
        lines += ["from megatron_grouter.offline.hf_grouter_routing import attach_grouter",
                  "attach_grouter(model, '<this directory>/grouter')  # pip install megatron-grouter",
                  "```", "",
                  f"This target was trained with preemptive routing (router.type={root.router.type}): a frozen "
                  "Grouter chooses every token's experts and gate weights from the token ids, for all MoE layers.",
                  f"The `gate` weights in this directory are {gates}. Without `attach_grouter` the model "
                  "routes by those gates, not by the experts it was trained with, and its outputs are wrong.",
                  f"The Grouter is in `grouter/` (copied from {grouter_dir}); `attach_grouter` replaces each "
                  "layer's routing by the Grouter's for the ids of each forward (no KV-cache generation: "
                  "call the model on the whole sequence)."]
    return "\n".join(lines) + "\n"


def export_hf(checkpoint: str | Path, out_dir: str | Path, layout: str = "auto",
              dtype: str = "float32") -> Path:
    from megatron_grouter.offline.sources.megatron_checkpoint import resolve_checkpoint
    from megatron_grouter.runtime.distributed import init_distributed
    from megatron_grouter.training.config import to_train_config

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not empty; pass a new directory")
    state = json.loads((path / "train_state.json").read_text())
    root = to_train_config(state["config"])
    layout = choose_layout(root, layout)
    grouter_routed = root.router.type in ROUTED_BY_GROUTER
    grouter_dir = root.router.grouter.path if grouter_routed else None
    if grouter_routed and (not grouter_dir or not Path(grouter_dir).is_dir()):
        raise UserError(f"{path} is Grouter-routed but its Grouter {grouter_dir} is not here; the export needs "
                        "it beside the weights")
    init_distributed()
    gpt = _load_gpt_model(path, root, state)
    tensors = hf_state_dict(gpt.state_dict(), root, layout, gpt.config, grouter_routed)
    config = hf_config(root, layout, state["vocab_size"], gpt.config)
    hf_model = _load_into_hf(config, tensors, getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    _copy_tokenizer(root.data.tokenizer, out_dir)
    if grouter_routed:
        shutil.copytree(grouter_dir, out_dir / "grouter")
    (out_dir / README).write_text(_readme(layout, root, grouter_dir, path))
    (out_dir / "megatron_grouter_export.json").write_text(json.dumps(
        {"checkpoint": str(path), "layout": layout, "router": root.router.type, "dtype": dtype,
         "grouter": "grouter" if grouter_routed else None,
         "scaling_factor": root.router.grouter.scaling_factor if grouter_routed else None,
         "activation_threshold": root.router.grouter.activation_threshold if grouter_routed else None},
        indent=2))
    return out_dir


def _load_gpt_model(path: Path, root, state: dict, context=None):
    """Our GPTModel with the checkpoint's weights (preemptive routers read `context`)."""
    from megatron_grouter.runtime.seed import set_seed
    from megatron_grouter.training.config import ParallelConfig
    from megatron_grouter.training.model import build_gpt_model
    from megatron_grouter.training.safe_checkpoint_read import verify_checkpoint_safe

    verify_checkpoint_safe(path)
    set_seed(root.train.seed)
    # experts as this machine runs them (a grouped-GEMM run's checkpoint loads into the per-expert
    # loop: megatron's sharded state dict names both the same)
    model_config = dataclasses.replace(root.model, grouped_gemm=None)
    model = build_gpt_model(model_config, root.router, ParallelConfig(), state["vocab_size"], context=context)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"]
    model.load_state_dict(loaded, strict=True)
    return model.eval()


def _copy_tokenizer(tokenizer: str | None, out_dir: Path) -> None:
    if not tokenizer:
        return
    source = Path(tokenizer)
    files = [source] if source.is_file() else [source / name for name in
                                               ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    for file in files:
        if file.is_file():
            shutil.copy(file, out_dir / file.name)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="mg-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an mg-train run directory, its checkpoints/ or one step_N dir")
    parser.add_argument("out_dir", help="new directory for the transformers model")
    parser.add_argument("--layout", default="auto", help=f"one of {', '.join(LAYOUTS)}")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    def job():
        out = export_hf(args.checkpoint, args.out_dir, args.layout, args.dtype)
        log.info("exported %s -> %s", args.checkpoint, out)

    return command_status(job)


if __name__ == "__main__":
    sys.exit(main())
