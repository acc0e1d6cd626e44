"""The routing-aware EP planner: routing top-k in, `Plan` plus a volume report out.

Steps: affinity vectors → initial expert groups (the paper's cluster + Hungarian, and token
co-activation partitioning) → joint search on a subsample of whole global batches → exact
capacity-constrained placement of every global batch → volumes against Megatron's default
layout and against the capacity-free relaxation. `method` picks "paper", "coactivation" or
"joint" (the better seed refined by the joint search). With granularity "node" the partitions are nodes;
a node's experts fill its ranks' slots in id order and its samples are split over its ranks in
batch order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from megatron_grouter.errors import UserError
from megatron_grouter.placement.affinity import affinity_vectors
from megatron_grouter.placement.bounds import capacity_free_sends
from megatron_grouter.placement.expert_groups import affinity_cluster_groups, coactivation_groups
from megatron_grouter.placement.joint_search import perturbed_search, placed_sends
from megatron_grouter.placement.layout import (
    contiguous_expert_to_rank,
    default_placement,
    placement_to_sample_rank,
    samples_per_rank,
    sequential_batches,
)
from megatron_grouter.placement.plan import GRANULARITIES, Plan
from megatron_grouter.placement.rank_hits import rank_hits
from megatron_grouter.placement.routing_input import check_partitioning, check_topk
from megatron_grouter.placement.sample_placement import place_batches
from megatron_grouter.placement.volumes import Volumes, compute_volumes

METHODS = ("paper", "coactivation", "joint")


@dataclass(frozen=True)
class PlannerSettings:
    """What to plan for and how hard to search."""

    ep_size: int
    global_batch: int
    ranks_per_node: int = 8
    granularity: str = "gpu"
    method: str = "joint"
    placement: str = "exact"
    entropy_threshold: float = 0.98
    num_clusters: int = 100
    perturbations: int = 2
    search_samples: int = 4096
    search_tokens: int = 1_000_000
    report_samples: int = 65_536
    seed: int = 0

    @property
    def num_partitions(self) -> int:
        return self.ep_size if self.granularity == "gpu" else self.ep_size // self.ranks_per_node

    def check(self, num_experts: int) -> None:
        """Raise UserError for settings that cannot produce a plan."""
        if self.granularity not in GRANULARITIES:
            raise UserError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if self.method not in METHODS:
            raise UserError(f"planner method {self.method!r} is not one of {METHODS}")
        if self.ranks_per_node < 1 or self.ep_size % self.ranks_per_node:
            raise UserError(f"EP size {self.ep_size} is not a multiple of {self.ranks_per_node} ranks per node")
        check_partitioning(num_experts, self.ep_size)
        samples_per_rank(self.global_batch, self.ep_size)


@dataclass(frozen=True)
class PlanReport:
    """Volumes of the default and planned layouts, the relaxation, and where time went."""

    default: Volumes
    planned: Volumes
    capacity_free_sends: float
    seconds: dict[str, float]
    batches: int = 1  # global batches the volumes were measured on

    def alltoall_lines(self, topology) -> list[str]:
        """Predicted per-layer all-to-all times of both layouts on `topology` (alltoall_time.py)."""
        from megatron_grouter.placement.alltoall_time import layer_time_lines

        return layer_time_lines(self.default.pairs_RR, self.planned.pairs_RR, self.batches, topology)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        ratios = self.planned.ratios_to(self.default)
        sends = self.default.dedup_sends_rank
        return [f"{name}: " + ("n/a (no such traffic in the default layout)" if value is None
                               else f"{value:.3f}x default") for name, value in ratios.items()] + [
            "capacity-free relaxation (same groups): "
            + (f"{self.capacity_free_sends / sends:.3f}x default" if sends else "n/a (no sends in the default layout)"),
            "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()),
        ]


def search_instance(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, settings: PlannerSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(topk, batches) to search on: random whole global batches, token positions thinned so
    that about `search_tokens` tokens remain (placement scores stay unbiased estimates)."""
    rng = np.random.default_rng(settings.seed)
    num_batches, global_batch = batches_QB.shape
    count = min(num_batches, max(1, settings.search_samples // global_batch))
    subset_QB = batches_QB[np.sort(rng.choice(num_batches, count, replace=False))]
    tokens = topk_SLK.shape[1]
    keep = min(tokens, max(1, settings.search_tokens // subset_QB.size))
    positions = np.sort(rng.choice(tokens, keep, replace=False))
    topk_sub = topk_SLK[subset_QB.ravel()][:, positions]
    return topk_sub, np.arange(subset_QB.size).reshape(subset_QB.shape)


def choose_groups(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, num_experts: int, settings: PlannerSettings
) -> np.ndarray:
    """Expert groups [E] over the settings' partitions, found on a subsample of batches."""
    partitions = settings.num_partitions
    topk_sub, local_QB = search_instance(topk_SLK, batches_QB, settings)
    seeds: list[np.ndarray] = []
    if settings.method in ("paper", "joint"):
        phi_SE = affinity_vectors(topk_sub, num_experts)
        seeds.append(affinity_cluster_groups(phi_SE, partitions, settings.entropy_threshold, settings.num_clusters, settings.seed))
    if settings.method in ("coactivation", "joint"):
        seeds.append(coactivation_groups(topk_sub, num_experts, partitions))
    if settings.method != "joint":
        return seeds[0]
    # refine only the better seed: descents from both mostly meet, and each costs the same
    start = min(seeds, key=lambda groups: placed_sends(topk_sub, local_QB, groups, partitions)[0])
    result = perturbed_search(topk_sub, local_QB, start, num_experts, partitions, settings.perturbations, seed=settings.seed)
    return result.expert_to_group


def _expand_to_ranks(placement_QNM: np.ndarray, ranks_per_partition: int) -> np.ndarray:
    num_batches, partitions, per_partition = placement_QNM.shape
    return placement_QNM.reshape(num_batches, partitions * ranks_per_partition, per_partition // ranks_per_partition)


def _report_volumes(
    topk_SLK: np.ndarray, batches_QB: np.ndarray, plan: Plan, settings: PlannerSettings
) -> tuple[Volumes, Volumes, float, int]:
    """Default and planned volumes plus the capacity-free bound, on at most `report_samples`
    samples (whole random batches), since each volume is a full pass over the routing."""
    num_batches, global_batch = batches_QB.shape
    count = min(num_batches, max(1, settings.report_samples // global_batch))
    chosen = np.sort(np.random.default_rng(settings.seed + 1).choice(num_batches, count, replace=False))
    num_samples = topk_SLK.shape[0]
    keep_S = np.zeros(num_samples, dtype=bool)
    keep_S[batches_QB[chosen].ravel()] = True
    planned_rank_S = np.where(keep_S, plan.sample_to_rank(num_samples), -1)
    default_rank_S = np.where(
        keep_S, placement_to_sample_rank(default_placement(batches_QB, settings.ep_size), num_samples), -1
    )
    ep, per_node = settings.ep_size, settings.ranks_per_node
    default = compute_volumes(topk_SLK, contiguous_expert_to_rank(plan.num_experts, ep), default_rank_S, ep, per_node)
    planned = compute_volumes(topk_SLK, plan.expert_to_rank(), planned_rank_S, ep, per_node)
    relaxed = capacity_free_sends(topk_SLK[np.flatnonzero(keep_S)], plan.expert_to_rank(), ep)
    return default, planned, relaxed, count


def make_plan(
    topk_SLK: np.ndarray,
    num_experts: int,
    settings: PlannerSettings,
    routing_cache_fingerprint: str,
    batches_QB: np.ndarray | None = None,
) -> tuple[Plan, PlanReport]:
    """Plan expert slots and per-batch sample placement; batches default to consecutive ids."""
    settings.check(num_experts)
    topk_SLK = check_topk(topk_SLK, num_experts)
    num_samples = topk_SLK.shape[0]
    if batches_QB is None:
        batches_QB = sequential_batches(num_samples, settings.global_batch)
    batches_QB = np.asarray(batches_QB, dtype=np.int64)
    if batches_QB.ndim != 2 or batches_QB.shape[1] != settings.global_batch:
        raise UserError(f"batches must have shape [num_batches, {settings.global_batch}], got {batches_QB.shape}")
    if batches_QB.min() < 0 or batches_QB.max() >= num_samples:
        raise UserError(f"batches name sample ids outside [0, {num_samples}); build them from this routing cache")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    groups_E = choose_groups(topk_SLK, batches_QB, num_experts, settings)
    seconds["groups"] = time.perf_counter() - started

    started = time.perf_counter()
    partitions = settings.num_partitions
    hit_SN, _ = rank_hits(topk_SLK, groups_E, partitions)
    placement_QNM = place_batches(hit_SN, batches_QB, settings.placement)
    placement_QRM = _expand_to_ranks(placement_QNM, settings.ep_size // partitions)
    seconds["placement"] = time.perf_counter() - started

    slot_to_expert = np.lexsort((np.arange(num_experts), groups_E))
    plan = Plan(
        num_experts=num_experts,
        top_k=int(topk_SLK.shape[2]),
        ep_size=settings.ep_size,
        ranks_per_node=settings.ranks_per_node,
        granularity=settings.granularity,
        routing_cache_fingerprint=routing_cache_fingerprint,
        slot_to_expert=slot_to_expert,
        placement_QRM=placement_QRM,
    )
    started = time.perf_counter()
    default, planned, relaxed, batches = _report_volumes(topk_SLK, batches_QB, plan, settings)
    seconds["volumes"] = time.perf_counter() - started
    report = PlanReport(default, planned, relaxed, seconds, batches)
    plan.stats = {"ratios_to_default": planned.ratios_to(default), "planned": planned.summary(), "default": default.summary()}
    return plan, report
