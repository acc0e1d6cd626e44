"""Expert expanding E_S → E_T > E_S: split the heaviest experts into children that keep their tokens.

Method (the reverse of folding; the released code expands, the paper only folds):
1. Parents: the E_T − E_S extra experts go to the heaviest source experts (load on the data), one
   extra child each, round-robin if there are more extra experts than source experts. A parent
   split into c children keeps its own slot for child 0; the others are appended after E_S, so every
   other expert keeps its index and its score row.
2. For each parent, the final hidden states h (`Grouter.hidden_states`) of the tokens whose top-k
   holds it are clustered by k-means into c clusters with centroids μ_j (mean μ̄).
3. Child j's score row is the parent's plus a separating term:
       z_j(h) = z_parent(h) + α·(s_j(h) − s̄),   s_j(h) = (μ_j − μ̄)·h − (‖μ_j‖² − 2μ̄·μ_j)/2,
   i.e. row_j = row_parent + α(μ_j − μ̄), bias_j = bias_parent + α(c_j − c̄) with s̄ the mean of
   the offsets c_j. argmax_j s_j(h) is exactly the k-means (nearest-centroid) assignment, and
   because Σ_j (μ_j − μ̄) = 0 the children's *mean* logit is the parent's logit for every h.
4. The expanded Grouter routes in two levels (`GrouterConfig.expert_groups`, grouter/gating.py):
   each parent's children form a group scored by their mean logit — the parent's logit — so the
   top-k over groups is the source's top-k over experts; within a chosen group the best child takes
   the token with the parent's gate weight. Hence, exactly (up to fp32 rounding of the mean): every
   token formerly routed to a split parent goes to one of its children, every other expert keeps
   its tokens and its gate weights. A single linear top-k over E_T logits cannot promise this for
   top-k > 1 (a losing child can push another expert out), which is why the groups exist.
5. α only sets how sharp the within-group choice is for the differentiable load-balancing loss of
   tuning (softmax over the children): per parent, α makes the median winner–runner-up margin of
   its tokens `TARGET_MARGIN` logits. `ExpandResult.violation_rate` checks the exactness on the data.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.grouter.gating import choose_experts

TARGET_MARGIN = 2.0  # logits between the winning child and the runner-up (median token)


@dataclass
class ExpandResult:
    grouter: object
    parents: dict[int, list[int]]          # parent → its children (parent first)
    alpha: dict[int, float]               # parent → sharpness of its children's split
    violation_rate: float
    tokens: int
    details: dict = field(default_factory=dict)


def children_per_parent(load_E: np.ndarray, num_target: int) -> dict[int, int]:
    """Children count of each split parent: extra experts to the heaviest, round-robin."""
    num_source = len(load_E)
    if not isinstance(num_target, int) or num_target <= 0:
        raise UserError(f"target number of experts {num_target!r} must be a positive integer; set num_experts > 0")
    if num_target <= num_source:
        raise UserError(f"expanding needs more target experts than the source's {num_source}, got "
                        f"{num_target}; use mg-fold to shrink the expert count")
    order = np.argsort(-np.asarray(load_E, dtype=np.float64), kind="stable").tolist()
    counts: dict[int, int] = {}
    for extra in range(num_target - num_source):
        parent = order[extra % num_source]
        counts[parent] = counts.get(parent, 1) + 1
    return counts


def separating_terms(hidden_NH: np.ndarray, num_children: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k-means of a parent's tokens: directions [c, H] (μ_j − μ̄) and offsets [c] (nearest-centroid rule)."""
    from sklearn.cluster import KMeans

    if len(hidden_NH) < num_children:
        raise UserError(f"an expert to split saw only {len(hidden_NH)} tokens, fewer than its {num_children} "
                        "children; give mg-expand more data (max_tokens)")
    kmeans = KMeans(n_clusters=num_children, n_init=3, random_state=seed).fit(hidden_NH.astype(np.float64))
    centroids_CH = kmeans.cluster_centers_
    mean_H = centroids_CH.mean(axis=0)
    directions_CH = centroids_CH - mean_H
    offsets_C = -((centroids_CH ** 2).sum(axis=1) - 2 * centroids_CH @ mean_H) / 2
    return directions_CH, offsets_C


def _topk_sets(logits_TE: torch.Tensor, bias_E: torch.Tensor, topk: int,
               groups_E: torch.Tensor | None = None) -> torch.Tensor:
    """[T, E] booleans: the experts each token's (biased, two-level with groups) top-k selects."""
    selected_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
    return selected_TE.scatter_(1, choose_experts(logits_TE + bias_E, topk, groups_E), True)


def count_violations(old_TE: torch.Tensor, new_TE: torch.Tensor, families: dict[int, list[int]]) -> int:
    """Tokens whose new selection is not their old one with each split parent replaced by one child."""
    num_source = old_TE.shape[1]
    untouched = [e for e in range(num_source) if e not in families]
    bad_T = (old_TE[:, untouched] != new_TE[:, untouched]).any(dim=1)
    for parent, children in families.items():
        in_children_T = new_TE[:, children].sum(dim=1)
        bad_T |= in_children_T != old_TE[:, parent].long()
    return int(bad_T.sum())


@torch.no_grad()
def collect_routing(grouter, batches, batch_size: int, max_tokens: int | None,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [T, H] (fp32) and logits [T, E] of the real tokens of the first windows."""
    from megatron_grouter.offline.affinity import window_row_batches

    window = batches.windows.window
    max_windows = None if max_tokens is None else max(1, -(-int(max_tokens) // window))
    grouter = grouter.to(device).eval()
    hidden, logits = [], []
    for rows in window_row_batches(len(batches), batch_size, max_windows=max_windows):
        tokens_BW, mask_BW = batches.gather(rows)
        mask_BW = mask_BW.to(device)
        hidden_BWH = grouter.hidden_states(tokens_BW.to(device), mask_BW).float()
        hidden.append(hidden_BWH[mask_BW].cpu())
        logits.append(grouter.score(hidden_BWH)[mask_BW].cpu())
    return torch.cat(hidden), torch.cat(logits)


def split_sharpness(s_TC: torch.Tensor) -> float:
    """α giving a median margin of TARGET_MARGIN between the winning and the second child."""
    top2 = s_TC.topk(2, dim=1).values
    median_margin = float((top2[:, 0] - top2[:, 1]).median())
    return TARGET_MARGIN / max(median_margin, 1e-12)


@torch.no_grad()
def expand_grouter(grouter, hidden_TH: torch.Tensor, logits_TE: torch.Tensor, num_target: int,
                   seed: int = 0) -> ExpandResult:
    """Split the heaviest experts of `grouter` (routing of `hidden_TH`/`logits_TE`) up to E_T experts."""
    from megatron_grouter.grouter.network import Grouter

    config = grouter.config
    if grouter.score.bias is None:
        raise UserError("expanding needs a Grouter with a score bias (score_bias=true) to centre its children")
    if config.expert_groups is not None:
        raise UserError("this Grouter was expanded already; expand its source once to the final "
                        "expert count instead")
    num_source, topk = config.num_experts, config.topk
    bias_E = grouter.expert_bias.detach().float().cpu()
    old_TE = _topk_sets(logits_TE, bias_E, topk)
    counts = children_per_parent(old_TE.sum(dim=0).numpy(), num_target)
    families, next_slot = {}, num_source
    for parent in sorted(counts):
        families[parent] = [parent] + list(range(next_slot, next_slot + counts[parent] - 1))
        next_slot += counts[parent] - 1

    hidden = hidden_TH.double()
    terms, alphas = {}, {}  # parent → (directions [c, H], centred offsets [c])
    for parent, children in families.items():
        mine = old_TE[:, parent]
        directions_CH, offsets_C = separating_terms(hidden[mine].numpy(), len(children), seed)
        directions, offsets = torch.from_numpy(directions_CH), torch.from_numpy(offsets_C)
        terms[parent] = (directions, offsets - offsets.mean())
        alphas[parent] = split_sharpness(hidden[mine] @ directions.T + offsets)
    groups = list(range(num_source)) + [0] * (num_target - num_source)
    for parent, children in families.items():
        for child in children:
            groups[child] = parent
    new_config = dataclasses.replace(config, num_experts=num_target, expert_groups=tuple(groups))
    state = copy.deepcopy(grouter.state_dict())
    state.update(_score_rows(grouter, num_target, families, terms, alphas))
    expanded = Grouter(new_config)
    expanded.load_state_dict(state, strict=True)
    new_logits_TE = torch.nn.functional.linear(hidden_TH.float(), state["score.weight"], state["score.bias"])
    new_TE = _topk_sets(new_logits_TE, state["expert_bias"], topk, expanded.expert_groups)
    violations = count_violations(old_TE, new_TE, families)
    return ExpandResult(grouter=expanded.to(grouter.score.weight.device), parents=families, alpha=alphas,
                        violation_rate=violations / max(len(old_TE), 1), tokens=len(old_TE))


def _score_rows(grouter, num_target: int, families, terms, alphas) -> dict[str, torch.Tensor]:
    """score.weight / score.bias / expert_bias of the expanded Grouter (fp32, on CPU)."""
    weight = grouter.score.weight.detach().double().cpu()
    bias = grouter.score.bias.detach().double().cpu()
    expert_bias = grouter.expert_bias.detach().double().cpu()
    num_source = len(weight)
    new_weight = torch.zeros(num_target, weight.shape[1], dtype=torch.float64)
    new_bias = torch.zeros(num_target, dtype=torch.float64)
    new_expert_bias = torch.zeros(num_target, dtype=torch.float64)
    new_weight[:num_source], new_bias[:num_source], new_expert_bias[:num_source] = weight, bias, expert_bias
    for parent, children in families.items():
        directions, centred_offsets = terms[parent]
        alpha = alphas[parent]
        for position, child in enumerate(children):
            new_weight[child] = weight[parent] + alpha * directions[position]
            new_bias[child] = bias[parent] + alpha * centred_offsets[position]
            new_expert_bias[child] = expert_bias[parent]
    return {"score.weight": new_weight.float(), "score.bias": new_bias.float(),
            "expert_bias": new_expert_bias.float()}
