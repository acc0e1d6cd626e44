"""Expert folding E_S → E_T < E_S (paper §3.2): group source experts, sum each group's logits.

Group sizes: ⌊E_S/E_T⌋, and E_S mod E_T of the groups get one more (the first ones built).
Strategies:
- `affinity` (the paper's): start a group from the heaviest unassigned expert (load = P_ii), then
  repeatedly add the unassigned expert with the largest summed co-activation with the group's
  members, until the group is full. Experts that fire together end up in one target expert.
- `balance`: heaviest first, each expert joins the lightest group that still has room (pairs heavy
  experts with light ones; equalises group loads).
- `random`: a seeded permutation cut into groups (the ablation baseline).

Mapping M ∈ {0,1}^{E_S×E_T}, M_ij = 1 iff source expert i is in group j. The paper folds the
score layer as W̃_s = W_s·M (W_s: hidden×E_S); with nn.Linear's weight [E, H] this is
W̃ = Mᵀ·W: each target row is the *sum* of its group's source rows, so a target logit is the sum
of its group's source logits (not a log-sum-exp or a max — summing is the paper's rule and keeps
the layer linear). The score bias and the selection bias `expert_bias` are folded the same way.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch

from megatron_grouter.errors import UserError

STRATEGIES = ("affinity", "balance", "random")


def group_sizes(num_source: int, num_target: int) -> list[int]:
    """Sizes of the E_T groups: the first E_S mod E_T are one larger."""
    check_fold_sizes(num_source, num_target)
    base, extra = divmod(num_source, num_target)
    return [base + 1 if group < extra else base for group in range(num_target)]


def check_fold_sizes(num_source: int, num_target: int) -> None:
    if not isinstance(num_target, int) or num_target <= 0:
        raise UserError(f"target number of experts {num_target!r} must be a positive integer; set num_experts > 0")
    if num_target >= num_source:
        raise UserError(f"folding needs fewer target experts than the source's {num_source}, got {num_target}; "
                        "use mg-expand to grow the expert count")


def affinity_groups(affinity_EE: np.ndarray, num_target: int) -> list[list[int]]:
    """The paper's greedy grouping by summed co-activation (see module docstring)."""
    matrix = np.asarray(affinity_EE, dtype=np.float64)
    num_source = matrix.shape[0]
    load = np.diag(matrix).copy()
    links = matrix.copy()
    np.fill_diagonal(links, 0.0)
    unassigned = np.ones(num_source, dtype=bool)
    groups = []
    for size in group_sizes(num_source, num_target):
        seed = int(np.flatnonzero(unassigned)[np.argmax(load[unassigned])])
        group, unassigned[seed] = [seed], False
        summed = links[seed].copy()
        while len(group) < size:
            candidates = np.flatnonzero(unassigned)
            # ties (e.g. no co-activation at all) go to the heavier expert, then the lower index
            order = np.lexsort((candidates, -load[candidates], -summed[candidates]))
            chosen = int(candidates[order[0]])
            group.append(chosen)
            unassigned[chosen] = False
            summed += links[chosen]
        groups.append(sorted(group))
    return groups


def balance_groups(load_E: np.ndarray, num_target: int) -> list[list[int]]:
    """Heaviest first into the lightest group with room: pairs heavy experts with light ones."""
    load = np.asarray(load_E, dtype=np.float64)
    sizes = group_sizes(len(load), num_target)
    groups: list[list[int]] = [[] for _ in sizes]
    group_load = np.zeros(num_target)
    for expert in np.argsort(-load, kind="stable").tolist():
        open_groups = [g for g in range(num_target) if len(groups[g]) < sizes[g]]
        target = min(open_groups, key=lambda g: (group_load[g], -sizes[g] + len(groups[g]), g))
        groups[target].append(expert)
        group_load[target] += load[expert]
    return [sorted(group) for group in groups]


def random_groups(num_source: int, num_target: int, seed: int = 0) -> list[list[int]]:
    permutation = np.random.default_rng(seed).permutation(num_source).tolist()
    groups, first = [], 0
    for size in group_sizes(num_source, num_target):
        groups.append(sorted(permutation[first:first + size]))
        first += size
    return groups


def fold_groups(affinity_EE: np.ndarray, num_target: int, strategy: str = "affinity",
                seed: int = 0) -> list[list[int]]:
    """Groups of source experts, one per target expert, by `strategy`."""
    matrix = np.asarray(affinity_EE)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise UserError(f"affinity must be a square [E, E] matrix, got shape {matrix.shape}")
    if strategy == "affinity":
        return affinity_groups(matrix, num_target)
    if strategy == "balance":
        return balance_groups(np.diag(matrix), num_target)
    if strategy == "random":
        check_fold_sizes(matrix.shape[0], num_target)
        return random_groups(matrix.shape[0], num_target, seed)
    raise UserError(f"fold strategy {strategy!r} is unknown; choose one of {list(STRATEGIES)}")


def mapping_matrix(groups: list[list[int]], num_source: int) -> np.ndarray:
    """M ∈ {0,1}^{E_S×E_T}; refuses groups that do not partition the source experts."""
    mapping = np.zeros((num_source, len(groups)), dtype=np.int64)
    for target, group in enumerate(groups):
        mapping[group, target] += 1
    if not (mapping.sum(axis=1) == 1).all():
        raise UserError("fold groups must place every source expert in exactly one group")
    return mapping


def within_group_mass(affinity_EE: np.ndarray, groups: list[list[int]]) -> float:
    """Share of off-diagonal co-activation that stays inside groups (what affinity folding maximises)."""
    links = np.asarray(affinity_EE, dtype=np.float64).copy()
    np.fill_diagonal(links, 0.0)
    inside = sum(links[np.ix_(group, group)].sum() for group in groups)
    return float(inside / max(links.sum(), 1e-12))


@torch.no_grad()
def fold_grouter(grouter, mapping_ST: np.ndarray):
    """A new Grouter with E_T = M.shape[1] experts: score rows, bias and expert_bias summed by group."""
    from megatron_grouter.grouter.network import Grouter

    mapping = torch.as_tensor(np.asarray(mapping_ST), dtype=torch.float32)
    num_source, num_target = mapping.shape
    if num_source != grouter.config.num_experts:
        raise UserError(f"the fold mapping has {num_source} source experts but the Grouter has "
                        f"{grouter.config.num_experts}; build the mapping for this Grouter")
    if grouter.config.expert_groups is not None:
        raise UserError("this Grouter was expanded (two-level routing); fold its source Grouter instead")
    if grouter.config.topk > num_target:
        raise UserError(f"cannot fold to {num_target} experts: the Grouter selects top-{grouter.config.topk}; "
                        f"choose num_experts >= {grouter.config.topk}")
    config = dataclasses.replace(grouter.config, num_experts=num_target)
    folded = Grouter(config)
    state = {name: tensor for name, tensor in copy.deepcopy(grouter.state_dict()).items()
             if not name.startswith("score.") and name != "expert_bias"}
    mapping_TS = mapping.T.to(grouter.score.weight.device)
    state["score.weight"] = mapping_TS @ grouter.score.weight.float()
    if grouter.score.bias is not None:
        state["score.bias"] = mapping_TS @ grouter.score.bias.float()
    state["expert_bias"] = mapping_TS @ grouter.expert_bias.float()
    folded.load_state_dict(state, strict=True)
    return folded.to(grouter.score.weight.device)
