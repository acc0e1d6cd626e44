"""mg-train's side of a placement plan: load it, refuse a mismatch in one line, and hand the
trainer the expert permutation, the planned schedule and the EP traffic hook.

The plan must belong to this run: the same routing cache (fingerprint), EP size, expert count,
top-k, global batch and GPTDataset sample order, and cover every step. Its rank r = dp_rank mod EP
mapping assumes megatron's expert grid with TP = PP = 1 (checked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megatron_grouter.errors import UserError
from megatron_grouter.placement.plan import Plan
from megatron_grouter.placement.schedule import PlannedSchedule
from megatron_grouter.placement.traffic import EPTrafficMeter
from megatron_grouter.placement.training_samples import cache_fingerprint, sample_order_fingerprint

log = logging.getLogger("megatron_grouter")


@dataclass
class TrainingPlan:
    plan: Plan
    schedule: PlannedSchedule

    def trainer_arguments(self) -> dict:
        """Keyword arguments for Trainer: slot of each Grouter expert, and the schedule."""
        return {"slot_of_expert": torch.from_numpy(self.plan.expert_to_slot()), "schedule": self.schedule}


def _routing_cache_manifest(root, prefix: str) -> dict:
    from megatron_grouter.data.routing_cache import open_cache
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint
    from megatron_grouter.routing.setup import default_cache_dir

    settings = root.router.grouter
    if not settings.path:
        raise UserError("router.grouter.plan needs router.grouter.path (the Grouter the plan was made for)")
    cache_dir = settings.cache or default_cache_dir(prefix, grouter_fingerprint(settings.path))
    return open_cache(cache_dir, prefix, num_experts=root.model.num_experts, topk=root.model.topk).manifest


def check_plan_fits(plan: Plan, root, fingerprint: str, train_dataset) -> None:
    """One UserError for the first way the plan does not belong to this run."""
    fix = "rerun mg-plan-ep with this run's settings"
    plan.check_matches(fingerprint)
    if plan.ep_size != root.parallel.expert:
        raise UserError(f"placement plan is for EP {plan.ep_size} but parallel.expert={root.parallel.expert}; {fix}")
    if plan.num_experts != root.model.num_experts or plan.top_k != root.model.topk:
        raise UserError(f"placement plan is for {plan.num_experts} experts top-{plan.top_k}, the model has "
                        f"{root.model.num_experts} top-{root.model.topk}; {fix}")
    if plan.global_batch != root.train.global_batch_size:
        raise UserError(f"placement plan is for global batch {plan.global_batch}, not train.global_batch_size="
                        f"{root.train.global_batch_size}; {fix}")
    if root.train.steps > plan.placement_QRM.shape[0]:
        raise UserError(f"placement plan covers {plan.placement_QRM.shape[0]} steps, train.steps={root.train.steps}; {fix}")
    if plan.training.get("sample_order") != sample_order_fingerprint(train_dataset):
        raise UserError("placement plan was made for another sample order (train.seq_length, seed, steps, "
                        f"data.split or dataset differ); {fix}")


def load_training_plan(root, prefix: str, train_dataset) -> TrainingPlan | None:
    """The run's plan (router.grouter.plan), checked against it; None without a plan."""
    from megatron.core import parallel_state

    from megatron_grouter.routing.registry import router_kind

    path = root.router.grouter.plan
    if not path:
        return None
    if not router_kind(root.router.type).preemptive or root.router.type == "hash":
        raise UserError(f"router.grouter.plan needs a Grouter router (router=grouter_fixed or grouter_hybrid), "
                        f"not {root.router.name}")
    if root.parallel.tensor != 1 or root.parallel.pipeline != 1:
        raise UserError("router.grouter.plan supports parallel.tensor=1 and parallel.pipeline=1 only")
    plan = Plan.load(path)
    check_plan_fits(plan, root, cache_fingerprint(_routing_cache_manifest(root, prefix)), train_dataset)
    dp_rank = parallel_state.get_data_parallel_rank()
    if parallel_state.get_expert_model_parallel_rank() != dp_rank % plan.ep_size:
        raise UserError("this parallel layout does not put EP rank r at dp_rank ≡ r (mod EP); use TP=PP=1")
    ratio = plan.stats.get("ratios_to_default", {}).get("dedup_sends_rank")
    log.info("placement plan %s: EP %d, %d global batches, planned dedup sends %s of the default layout",
             path, plan.ep_size, plan.placement_QRM.shape[0], f"{ratio:.3f}x" if ratio is not None else "n/a")
    return TrainingPlan(plan, PlannedSchedule(plan, parallel_state.get_data_parallel_world_size()))


def traffic_meter(root, plan: Plan | None) -> EPTrafficMeter | None:
    """EP traffic metrics for preemptive Grouter routing under expert parallelism (or a plan)."""
    from megatron.core import parallel_state

    from megatron_grouter.routing.registry import router_kind

    if not router_kind(root.router.type).preemptive or (root.parallel.expert == 1 and plan is None):
        return None
    return EPTrafficMeter(root.model.num_experts, root.parallel.expert,
                          parallel_state.get_expert_model_parallel_rank(), root.parallel.ranks_per_node,
                          group=parallel_state.get_data_parallel_group())
