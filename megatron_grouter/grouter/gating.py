"""From expert logits to routing: top-k selection (optionally biased) and gate weights.

The selection bias only moves *which* experts are chosen (aux-loss-free style balancing); the gate
weights always come from the raw logits of the chosen experts:
- softmax: softmax over the k selected logits;
- sigmoid: sigmoid of the k selected logits, normalised to sum to 1;
then both are multiplied by `scaling_factor`, so each token's weights sum to it.
"""

from __future__ import annotations

import torch

from megatron_grouter.errors import UserError


def select_experts(logits_BSE: torch.Tensor, topk: int, score_function: str, scaling_factor: float,
                   bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (int64) and their gate weights (fp32), both [..., k]."""
    logits_BSE = logits_BSE.float()
    num_experts = logits_BSE.shape[-1]
    if not 1 <= topk <= num_experts:
        raise UserError(f"topk={topk} must be between 1 and the number of experts ({num_experts})")
    selection_BSE = logits_BSE
    if bias_E is not None:
        if bias_E.shape != (num_experts,):
            raise UserError(f"expert bias has shape {tuple(bias_E.shape)} but there are {num_experts} "
                            f"experts; pass a bias of shape ({num_experts},)")
        selection_BSE = logits_BSE + bias_E.to(device=logits_BSE.device, dtype=torch.float32)
    indices_BSK = selection_BSE.topk(topk, dim=-1).indices
    chosen_BSK = logits_BSE.gather(-1, indices_BSK)
    if score_function == "softmax":
        weights_BSK = chosen_BSK.softmax(dim=-1)
    elif score_function == "sigmoid":
        gates_BSK = chosen_BSK.sigmoid()
        weights_BSK = gates_BSK / gates_BSK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        raise UserError(f"score_function={score_function!r} is unknown; choose softmax or sigmoid")
    return indices_BSK.long(), weights_BSK * scaling_factor
