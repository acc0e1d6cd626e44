"""Teacher logits that rank experts the way the source model really selects them.

For most families the model picks the top-k of its raw router logits, so the raw logits are the
right teacher. Some do not: DeepSeek-V3 (and GLM-4-MoE, dots.llm1, EXAONE-MoE) pick from
`sigmoid(logits) + e_score_correction_bias`, only inside the `topk_group` best of `n_group` expert
groups; DeepSeek-V2 limits the choice to the best groups of its softmax; ERNIE 4.5 adds a bias to
its softmax. A Grouter distilled from raw logits then learns a ranking the model does not route
by (for DeepSeek-V3 the raw top-k matches its real selection for about a quarter of tokens).

`routed_logits` maps the raw logits to logits whose order is the model's selection order:
experts outside the chosen groups fall `_MASK_MARGIN` below every allowed one, and the selection
score `c` of an allowed expert becomes `logit(c)` (a strictly increasing map that gives back the
raw logit when the bias is zero and c = sigmoid(logit)), extended linearly outside
[_EDGE, 1 - _EDGE] so bias-shifted scores below 0 or above 1 keep their order. Their top-k is
exactly the set the model selects, which `real_selection` (the ids the router itself returns)
lets callers measure.
"""

from __future__ import annotations

import torch
from torch import nn

SELECTIONS = ("topk", "sigmoid_bias_group", "softmax_group", "softmax_bias")
ROUTING_TARGETS = ("auto", "raw", "routed")
AUTO_MIN_AGREEMENT = 0.99  # auto: raw logits unless their top-k disagrees with the real choice more often
_EDGE = 1e-4
_MASK_MARGIN = 30.0


def _logit_extended(scores_TE: torch.Tensor) -> torch.Tensor:
    inside_TE = scores_TE.clamp(_EDGE, 1 - _EDGE)
    slope = 1.0 / (_EDGE * (1 - _EDGE))  # d logit / dc at the edges: continuous and increasing
    return torch.logit(inside_TE) + slope * (scores_TE - inside_TE)


def _group_mask(choice_TE: torch.Tensor, num_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """Bool [T, E]: experts inside each token's `topk_groups` best groups."""
    tokens, experts = choice_TE.shape
    grouped_TGM = choice_TE.view(tokens, num_groups, experts // num_groups)
    if group_score == "top2_sum":  # DeepSeek-V3: sum of the two best scores of the group
        group_TG = grouped_TGM.topk(min(2, experts // num_groups), dim=-1).values.sum(-1)
    else:  # DeepSeek-V2: the best score of the group
        group_TG = grouped_TGM.max(dim=-1).values
    chosen_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(
        1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return chosen_TG.unsqueeze(-1).expand(-1, -1, experts // num_groups).reshape(tokens, experts)


def _masked(values_TE: torch.Tensor, allowed_TE: torch.Tensor) -> torch.Tensor:
    floor_T1 = values_TE.masked_fill(~allowed_TE, float("inf")).min(dim=-1, keepdim=True).values
    return torch.where(allowed_TE, values_TE, floor_T1 - _MASK_MARGIN)


def _bias(router: nn.Module) -> torch.Tensor:
    for holder in (router, getattr(router, "moe_statics", None)):
        bias = getattr(holder, "e_score_correction_bias", None) if holder is not None else None
        if bias is not None:
            return bias.detach().float().reshape(-1)
    raise RuntimeError(f"{type(router).__name__} has no e_score_correction_bias")


def routed_logits(router: nn.Module, logits_TE: torch.Tensor, selection: str) -> torch.Tensor:
    """Float32 [T, E] logits whose top-k is the expert set the model selects (see module doc)."""
    logits_TE = logits_TE.float()
    if selection == "topk":
        return logits_TE
    if selection == "sigmoid_bias_group":
        choice_TE = logits_TE.sigmoid() + _bias(router).to(logits_TE.device)
        allowed_TE = _group_mask(choice_TE, int(router.num_group), int(router.topk_group), "top2_sum")
        return _masked(_logit_extended(choice_TE), allowed_TE)
    if selection == "softmax_group":
        if getattr(router, "topk_method", "greedy") != "group_limited_greedy":
            return logits_TE  # greedy: top-k of the softmax, i.e. of the logits
        allowed_TE = _group_mask(logits_TE.softmax(-1), int(router.num_group), int(router.topk_group), "max")
        return _masked(logits_TE, allowed_TE)
    if selection == "softmax_bias":
        return _logit_extended(logits_TE.softmax(-1) + _bias(router).to(logits_TE.device))
    raise ValueError(f"unknown selection {selection!r}")


def real_selection(router_output: object) -> torch.Tensor | None:
    """The expert ids [T, k] a router returned, or None when it returns none (top-k of logits)."""
    if isinstance(router_output, tuple) and len(router_output) >= 3:
        indices = router_output[2]
        if isinstance(indices, torch.Tensor) and not indices.dtype.is_floating_point:
            return indices
    return None


def topk_agreement(logits_TE: torch.Tensor, indices_TK: torch.Tensor) -> float:
    """Fraction of tokens whose top-k set of `logits_TE` equals the selected set `indices_TK`."""
    topk = indices_TK.shape[-1]
    ours_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(1, logits_TE.topk(topk, -1).indices, True)
    real_TE = torch.zeros_like(ours_TE).scatter(1, indices_TK.long(), True)
    return float((ours_TE == real_TE).all(-1).float().mean())
