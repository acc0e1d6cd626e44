"""From expert logits to routing: top-k selection (optionally biased, optionally by expert group)
and gate weights.

The selection bias only moves *which* experts are chosen (aux-loss-free style balancing); the gate
weights always come from the raw logits of the chosen experts:
- softmax: softmax over the k selected logits;
- sigmoid: sigmoid of the k selected logits, normalised to sum to 1;
then both are multiplied by `scaling_factor`, so each token's weights sum to it.

Expert groups (an expanded Grouter, see offline/expanding.py): `groups_E[e]` is the group of
expert e. Routing is then two-level: a group's score is the mean of its experts' scores, the top-k
*groups* are chosen, and within each chosen group the expert with the highest score takes the
token; the gate weight of that expert is the group's. An expert alone in its group behaves exactly
as without groups, so a Grouter whose split parents became groups of children keeps every other
expert's decisions, and each former parent token goes to exactly one child.
"""

from __future__ import annotations

import torch

from megatron_grouter.errors import UserError


def group_mean(values_TE: torch.Tensor, groups_E: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean over each group's experts along the last dim: [..., E] → [..., G]."""
    groups_E = groups_E.to(values_TE.device)
    sums = torch.zeros(*values_TE.shape[:-1], num_groups, dtype=values_TE.dtype, device=values_TE.device)
    sums.index_add_(-1, groups_E, values_TE)
    sizes_G = torch.bincount(groups_E, minlength=num_groups).to(values_TE.dtype)
    return sums / sizes_G


def choose_experts(selection_TE: torch.Tensor, topk: int,
                   groups_E: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k expert ids [..., k] of selection scores; two-level when `groups_E` is given."""
    if groups_E is None:
        return selection_TE.topk(topk, dim=-1).indices
    groups_E = groups_E.to(selection_TE.device)
    num_groups = int(groups_E.max()) + 1
    groups_TK = group_mean(selection_TE, groups_E, num_groups).topk(topk, dim=-1).indices
    # Within each chosen group: the best expert of that group (others masked out).
    member_TKE = groups_TK[..., None] == groups_E
    masked_TKE = selection_TE[..., None, :].masked_fill(~member_TKE, float("-inf"))
    return masked_TKE.argmax(dim=-1)


def expert_probabilities(logits_TE: torch.Tensor, groups_E: torch.Tensor | None = None) -> torch.Tensor:
    """The router's distribution over experts [..., E]: softmax, or softmax over group means times
    softmax within the group (what two-level selection takes the argmax of, level by level)."""
    if groups_E is None:
        return logits_TE.softmax(dim=-1)
    groups_E = groups_E.to(logits_TE.device)
    num_groups = int(groups_E.max()) + 1
    group_probs_TG = group_mean(logits_TE, groups_E, num_groups).softmax(dim=-1)
    group_max_TG = torch.full_like(group_probs_TG, float("-inf")).scatter_reduce(
        -1, groups_E.expand_as(logits_TE), logits_TE, reduce="amax")
    within_TE = (logits_TE - group_max_TG.gather(-1, groups_E.expand_as(logits_TE)).detach()).exp()
    within_sum_TG = torch.zeros_like(group_probs_TG).index_add(-1, groups_E, within_TE)
    within_TE = within_TE / within_sum_TG.gather(-1, groups_E.expand_as(logits_TE))
    return group_probs_TG.gather(-1, groups_E.expand_as(logits_TE)) * within_TE


def select_experts(logits_BSE: torch.Tensor, topk: int, score_function: str, scaling_factor: float,
                   bias_E: torch.Tensor | None = None,
                   groups_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k expert ids (int64) and their gate weights (fp32), both [..., k]."""
    logits_BSE = logits_BSE.float()
    num_experts = logits_BSE.shape[-1]
    num_choices = num_experts if groups_E is None else int(groups_E.max()) + 1
    if not 1 <= topk <= num_choices:
        raise UserError(f"topk={topk} must be between 1 and the number of experts or expert groups "
                        f"({num_choices})")
    selection_BSE = logits_BSE
    if bias_E is not None:
        if bias_E.shape != (num_experts,):
            raise UserError(f"expert bias has shape {tuple(bias_E.shape)} but there are {num_experts} "
                            f"experts; pass a bias of shape ({num_experts},)")
        selection_BSE = logits_BSE + bias_E.to(device=logits_BSE.device, dtype=torch.float32)
    indices_BSK = choose_experts(selection_BSE, topk, groups_E)
    if groups_E is None:
        chosen_BSK = logits_BSE.gather(-1, indices_BSK)
    else:
        groups_E = groups_E.to(logits_BSE.device)
        group_logits_BSG = group_mean(logits_BSE, groups_E, num_choices)
        chosen_BSK = group_logits_BSG.gather(-1, groups_E[indices_BSK])
    if score_function == "softmax":
        weights_BSK = chosen_BSK.softmax(dim=-1)
    elif score_function == "sigmoid":
        gates_BSK = chosen_BSK.sigmoid()
        weights_BSK = gates_BSK / gates_BSK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        raise UserError(f"score_function={score_function!r} is unknown; choose softmax or sigmoid")
    return indices_BSK.long(), weights_BSK * scaling_factor
