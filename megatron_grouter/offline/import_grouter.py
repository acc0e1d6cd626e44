"""mg-import-grouter: a Grouter published by the reference implementation (JimmyAwoe/Grouter) as ours.

    mg-import-grouter grouter_ft_32.pth outputs/grouter-ref-32 --tokenizer /models/Qwen3-30B-A3B \
        --structure-config utils_grouter/grouter/grouter_model/structure_config_32.json \
        --grouter-config utils_grouter/grouter/grouter_model/config_32.json

What the reference publishes (`grouter.pth`, `grouter_ft_{32,64,256}.pth`, `grouter_base.pth`) is
`torch.save(Grouter.state_dict())` of its `general_router.Grouter` wrapping a `GrouterMHA`:

    bias                                                   [E]   (used only after load_bias)
    grouter_structure.model.embed_tokens.embed_tokens.weight [V, H]
    grouter_structure.model.layers.{i}.input_layernorm.weight, .post_attention_layernorm.weight
    grouter_structure.model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    grouter_structure.model.layers.{i}.mlp.{gate,up,down}_proj.weight
    grouter_structure.model.norm.weight
    grouter_structure.score.score.weight                  [E, H]  (no bias)

(its distillation checkpoints `checkpoint_step_N.pt` hold such dicts under `grouter_states[layer]`).
The architecture is in its structure_config*.json (heads, rope_theta, rms_norm_eps, use_encoder,
no_pos_info) and the routing in its config*.json (topk; scaling_factor 2.5 and softmax unless
given). How its forward maps onto ours, read from its code:
  * use_encoder=true zeroes the attention mask: bidirectional attention over the whole window,
    like our encoder (use_encoder=false, causal, is refused);
  * its RoPE first regroups each head's q/k dims from interleaved pairs (0,1),(2,3).. to halves
    (even dims, then odd dims) and then rotates halves; permuting the q/k projection rows the same
    way gives our rotate-half RoPE the same vectors, and q·k is unchanged;
  * routing: top-k of the logits, softmax (or normalised sigmoid) over the chosen logits, times
    scaling_factor; the `bias` only enters after the reference's load_bias(), so it is imported
    only when --bias-file (a load_bias file) is given.
Everything is read with torch.load(weights_only=True): a pickle with code in it is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from megatron_grouter.app import command_status
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")
PREFIX = "grouter_structure."
# The values of the reference's published structure_config.json, used when none is given.
PUBLISHED_STRUCTURE = {"num_attention_heads": 8, "num_key_value_heads": 8, "rope_theta": 1000000.0,
                       "rms_norm_eps": 1e-6, "use_encoder": True, "no_pos_info": False,
                       "max_position_embeddings": 40960, "hidden_act": "silu", "num_scores": 1,
                       "attention_bias": False}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _load_weights_only(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except Exception as error:  # pickle.UnpicklingError for code, RuntimeError/EOFError for damage
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise UserError(f"{what} {path} is not a plain tensor file ({first}); refusing to load it") from None


def _read_json(path: str | None, what: str) -> dict:
    if path is None:
        return {}
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} must be a JSON object")
    return value


def reference_state_dict(checkpoint: str | Path, layer: int | None = None) -> dict[str, torch.Tensor]:
    """The reference Grouter state dict in `checkpoint` (.pth state dict or distillation .pt)."""
    path = Path(checkpoint)
    loaded = _load_weights_only(path, "reference Grouter checkpoint")
    if isinstance(loaded, dict) and "grouter_states" in loaded:
        states = loaded["grouter_states"]
        if not isinstance(states, dict) or not states:
            raise UserError(f"{path} has an empty grouter_states")
        if layer is None:
            if len(states) != 1:
                raise UserError(f"{path} holds Grouters for layers {sorted(states)}; pick one with --layer")
            layer = next(iter(states))
        if layer not in states:
            raise UserError(f"{path} has no Grouter for layer {layer}; it has {sorted(states)}")
        loaded = states[layer]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"{path} is not a reference Grouter state dict (expected name -> tensor)")
    if f"{PREFIX}score.score.weight" not in loaded:
        hint = " (a structure_type rl/rc/mla Grouter? only mha is supported)" if loaded else ""
        raise UserError(f"{path} lacks {PREFIX}score.score.weight; it is not a reference MHA Grouter{hint}")
    return {name.removeprefix(PREFIX): tensor for name, tensor in loaded.items()}


def _halves_order(num_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that turns each head's interleaved q/k dims into (even dims, odd dims)."""
    within_D = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return (torch.arange(num_heads)[:, None] * head_dim + within_D[None, :]).reshape(-1)


def convert(reference: dict[str, torch.Tensor], structure: dict, routing: dict, dtype: str = "float32"):
    """Our GrouterConfig and state dict for a reference MHA Grouter."""
    from megatron_grouter.grouter.config import GrouterConfig

    structure = {**PUBLISHED_STRUCTURE, **structure}
    if not structure.get("use_encoder", False):
        raise UserError("the reference Grouter has use_encoder=false (causal attention); ours is a "
                        "bidirectional encoder, so it cannot be imported exactly")
    if structure.get("num_scores", 1) != 1:
        raise UserError("multi-score reference Grouters (num_scores > 1) are not supported")
    if structure.get("attention_bias") or structure.get("hidden_act", "silu") != "silu":
        raise UserError("only bias-free, SiLU reference Grouters (the published ones) can be imported")
    if structure.get("rope_scaling"):
        raise UserError(f"reference rope_scaling={structure['rope_scaling']} has no equivalent here")
    heads, kv_heads = int(structure["num_attention_heads"]), int(structure["num_key_value_heads"])
    if kv_heads != heads:
        raise UserError(f"reference num_key_value_heads={kv_heads} != num_attention_heads={heads}; our "
                        "encoder has no grouped-query attention")
    layers = sorted({int(m.group(1)) for name in reference if (m := _LAYER.match(name))})
    if layers != list(range(len(layers))):
        raise UserError(f"reference Grouter layers {layers} are not 0..N-1; the checkpoint is damaged")
    if any(".mlp.experts." in name or ".mlp.gate.weight" in name for name in reference):
        raise UserError("the reference Grouter has MoE blocks inside (n_routed_experts set); only dense "
                        "encoders (the published ones) can be imported")
    vocab, hidden = reference["model.embed_tokens.embed_tokens.weight"].shape
    num_experts = reference["score.score.weight"].shape[0]
    ffn = reference["model.layers.0.mlp.gate_proj.weight"].shape[0] if layers else None
    topk = routing.get("topk")
    if topk is None:
        raise UserError("the reference Grouter's topk is unknown; pass --grouter-config config.json or --topk")
    config = GrouterConfig(
        vocab_size=int(vocab), num_experts=int(num_experts), topk=int(topk), hidden_size=int(hidden),
        num_layers=len(layers), num_heads=heads, ffn_hidden_size=int(ffn) if ffn else None, encoder="mha",
        use_positions=not structure.get("no_pos_info", False),
        max_seq_length=int(structure["max_position_embeddings"]), rope_base=float(structure["rope_theta"]),
        norm_eps=float(structure["rms_norm_eps"]), score_function=str(routing.get("scoring_fun", "softmax")),
        scaling_factor=float(routing.get("scaling_factor", 2.5)), score_bias=False, dtype=dtype,
        # the reference network is the paper's encoder: bidirectional, so mg-train refuses it for
        # a causal LM unless router.grouter.allow_future_context=true
        causal=False)
    order = _halves_order(heads, config.head_dim)
    state = {"embedding.weight": reference["model.embed_tokens.embed_tokens.weight"],
             "final_norm.weight": reference["model.norm.weight"],
             "score.weight": reference["score.score.weight"].float(),
             "expert_bias": torch.zeros(num_experts)}
    for index in layers:
        src, dst = f"model.layers.{index}", f"blocks.{index}"
        q = reference[f"{src}.self_attn.q_proj.weight"][order]
        k = reference[f"{src}.self_attn.k_proj.weight"][order]
        state.update({
            f"{dst}.attention_norm.weight": reference[f"{src}.input_layernorm.weight"],
            f"{dst}.attention.qkv.weight": torch.cat((q, k, reference[f"{src}.self_attn.v_proj.weight"])),
            f"{dst}.attention.out.weight": reference[f"{src}.self_attn.o_proj.weight"],
            f"{dst}.mlp_norm.weight": reference[f"{src}.post_attention_layernorm.weight"],
            f"{dst}.mlp.gate_up.weight": torch.cat((reference[f"{src}.mlp.gate_proj.weight"],
                                                    reference[f"{src}.mlp.up_proj.weight"])),
            f"{dst}.mlp.down.weight": reference[f"{src}.mlp.down_proj.weight"],
        })
    return config, state


def import_grouter(checkpoint: str | Path, out_dir: str | Path, tokenizer: str, structure_config: str | None = None,
                   grouter_config: str | None = None, topk: int | None = None,
                   scaling_factor: float | None = None, bias_file: str | None = None,
                   layer: int | None = None, dtype: str = "float32") -> Path:
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import new_provenance, save_grouter
    from megatron_grouter.grouter.network import Grouter

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r}: choose float32 or bfloat16")
    reference = reference_state_dict(checkpoint, layer)
    structure = _read_json(structure_config, "--structure-config")
    routing = _read_json(grouter_config, "--grouter-config")
    if topk is not None:
        routing["topk"] = topk
    if scaling_factor is not None:
        routing["scaling_factor"] = scaling_factor
    config, state = convert(reference, structure, routing, dtype)
    if "num_labels" in structure and int(structure["num_labels"]) != config.num_experts:
        raise UserError(f"--structure-config says num_labels={structure['num_labels']} but the checkpoint "
                        f"scores {config.num_experts} experts; pass the matching structure config")
    if bias_file is not None:
        bias = _load_weights_only(Path(bias_file), "--bias-file")
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (config.num_experts,):
            raise UserError(f"--bias-file {bias_file} must hold one tensor of shape ({config.num_experts},)")
        state["expert_bias"] = bias.float()
    grouter = Grouter(config)
    target = grouter.state_dict()
    wrong = [name for name in target if name not in state or tuple(state[name].shape) != tuple(target[name].shape)]
    if wrong:
        raise UserError(f"reference tensors do not fit a Grouter of this shape ({wrong[:3]}); the "
                        "checkpoint and structure config disagree")
    grouter.load_state_dict({name: state[name].to(target[name].dtype) for name in target}, strict=True)
    fingerprint = load_tokenizer(tokenizer).fingerprint()
    provenance = new_provenance(source_model=f"reference Grouter {Path(checkpoint).name}")
    provenance["imported_from"] = {"checkpoint": str(Path(checkpoint).resolve()), "format": "JimmyAwoe/Grouter",
                                   "structure_config": structure_config, "grouter_config": grouter_config,
                                   "bias_file": bias_file}
    return save_grouter(grouter.eval(), out_dir, provenance, fingerprint)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="mg-import-grouter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="reference grouter*.pth (or a distillation checkpoint_step_N.pt)")
    parser.add_argument("out_dir", help="where our Grouter checkpoint directory is written")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer it was distilled with (Qwen3's)")
    parser.add_argument("--structure-config", help="its structure_config*.json (default: the published one)")
    parser.add_argument("--grouter-config", help="its config*.json (topk, scoring_fun, scaling_factor)")
    parser.add_argument("--topk", type=int, help="experts per token (overrides --grouter-config)")
    parser.add_argument("--scaling-factor", type=float, help="gate scale (reference default 2.5)")
    parser.add_argument("--bias-file", help="a bias file the reference would load with load_bias()")
    parser.add_argument("--layer", type=int, help="which layer's Grouter of a multi-layer .pt")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    args = parser.parse_args(argv)
    def job():
        out = import_grouter(args.checkpoint, args.out_dir, args.tokenizer, args.structure_config,
                             args.grouter_config, args.topk, args.scaling_factor, args.bias_file,
                             args.layer, args.dtype)
        log.info("imported %s -> %s", args.checkpoint, out)

    return command_status(job)


if __name__ == "__main__":
    sys.exit(main())
