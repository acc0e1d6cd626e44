"""Route an exported Grouter-routed model inside transformers: what `mg-export` tells HF users to run.

A target trained with preemptive routing never learned a router: a frozen Grouter chose every
token's experts (and, for router.type=grouter_fixed, their gate weights) from the token ids, the
same choice for every MoE layer. `attach_grouter` reproduces that in a transformers Qwen-MoE model:
a forward pre-hook on the model routes `input_ids` with the Grouter (each row as one Grouter
window), and a forward hook on every MoE router replaces its (logits, weights, experts) output:

  grouter_fixed:  experts and weights from the Grouter, weights × router.grouter.scaling_factor,
                  then the dynamic-activation cut if the run used one (as FixedRouter does);
  grouter_hybrid: experts from the Grouter, weights = softmax of the layer's own gate logits over
                  those experts (as HybridRouter does).

Training routed each token inside its document window; pass documents (or windows of at most the
Grouter's max_seq_length) as rows to get the same routing. Incremental decoding with a KV cache
sees one token per step and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from megatron_grouter.errors import UserError

EXPORT_INFO = "megatron_grouter_export.json"


def _moe_routers(model: nn.Module) -> list[nn.Module]:
    routers = [module for name, module in model.named_modules()
               if name.endswith(".mlp.gate") and type(module).__name__.endswith("TopKRouter")]
    if not routers:
        raise UserError(f"{type(model).__name__} has no Qwen-MoE routers (mlp.gate); attach_grouter works "
                        "on models written by mg-export")
    return routers


def attach_grouter(model: nn.Module, grouter_dir: str | Path, export_info: dict | None = None) -> list:
    """Make `model` route by the Grouter in `grouter_dir`; returns the hook handles (remove to undo).

    `export_info` defaults to the megatron_grouter_export.json beside `grouter_dir`.
    """
    from megatron_grouter.grouter.checkpoint import load_grouter
    from megatron_grouter.routing.microbatch import threshold_mask

    grouter_dir = Path(grouter_dir)
    if export_info is None:
        info_path = grouter_dir.parent / EXPORT_INFO
        if not info_path.is_file():
            raise UserError(f"no {EXPORT_INFO} beside {grouter_dir}; pass export_info or use an mg-export directory")
        export_info = json.loads(info_path.read_text())
    mode = export_info.get("router")
    if mode not in ("grouter_fixed", "grouter_hybrid"):
        raise UserError(f"{EXPORT_INFO} says router={mode!r}; only Grouter-routed exports need attach_grouter")
    grouter, _ = load_grouter(grouter_dir, expected_num_experts=int(model.config.num_experts))
    device = next(model.parameters()).device
    grouter = grouter.to(device).eval()
    scaling = float(export_info.get("scaling_factor", 1.0))
    threshold = export_info.get("activation_threshold")
    state: dict[str, torch.Tensor] = {}

    def route_inputs(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise UserError("attach_grouter needs input_ids (the Grouter routes token ids, not embeddings)")
        if kwargs.get("past_key_values") is not None and kwargs["past_key_values"].get_seq_length() > 0:
            raise UserError("a Grouter routes whole windows; call the model on the full sequence "
                            "(use_cache=False) instead of decoding token by token")
        with torch.no_grad():
            indices_BSK, weights_BSK = grouter.route(input_ids)
        state["indices_TK"] = indices_BSK.reshape(-1, indices_BSK.shape[-1])
        state["weights_TK"] = weights_BSK.reshape(-1, weights_BSK.shape[-1])

    def replace_routing(module, args, output):
        logits_TE = output[0]
        indices_TK = state["indices_TK"].to(logits_TE.device)
        if mode == "grouter_hybrid":
            weights_TK = torch.softmax(logits_TE.float().gather(1, indices_TK), dim=-1)
        else:
            weights_TK = state["weights_TK"].to(logits_TE.device).float() * scaling
            if threshold is not None:
                weights_TK = weights_TK * threshold_mask(weights_TK, float(threshold) * scaling)
        return logits_TE, weights_TK.to(logits_TE.dtype), indices_TK

    handles = [model.register_forward_pre_hook(route_inputs, with_kwargs=True)]
    handles += [router.register_forward_hook(replace_routing) for router in _moe_routers(model)]
    return handles
