"""Routing-aware expert-parallel placement (paper §3.4.2, Algorithm 1, Appendix J, and beyond).

From the routing cache's top-k expert ids per training sample the planner decides which experts
share an EP rank (or node) and which rank trains each sample of every global batch, so that most
dispatched tokens stay local while every rank keeps an equal share of each batch.

Modules: routing_input (checks), affinity (φ vectors, entropy filter), rank_hits (per-sample
rank touches), layout (default layout, batch placements), volumes (pairs and dedup sends),
expert_groups (paper clustering + Hungarian; co-activation partitioning), token_patterns and
group_refinement (exact swap descent), sample_placement (equal-share placement per batch),
joint_search (alternation), bounds (relaxation, exact tiny optimum), plan (the saved Plan),
planner (make_plan), synthetic (routing with known structure). Training side: training_samples
(a run's samples' routing from the cache, fingerprints), schedule (PlannedSchedule),
training_plan (load and check a plan in mg-train), traffic (per-step EP traffic metrics).
"""

from megatron_grouter.placement.plan import Plan
from megatron_grouter.placement.planner import PlannerSettings, PlanReport, make_plan
from megatron_grouter.placement.volumes import Volumes, compute_volumes

__all__ = ["Plan", "PlannerSettings", "PlanReport", "Volumes", "compute_volumes", "make_plan"]
