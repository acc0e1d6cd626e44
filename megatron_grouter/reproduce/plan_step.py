"""The optional EP-placement step: plan expert groups and sample placement on the routing cache.

Calls the planner (megatron_grouter.placement.make_plan) directly on the first training-length
windows of the predispatched routing cache and reports the planned layout's dispatch volumes
against the default layout. The dispatcher that uses a plan at training time is not wired into
these CPU runs (EP=1), so this step reports volumes only. When the mg-plan-ep tool
(tools/plan_ep.py) lands, the lead may route this step through it instead.
"""

from __future__ import annotations

from pathlib import Path


def planner_available() -> bool:
    try:
        from megatron_grouter.placement import PlannerSettings, make_plan  # noqa: F401
    except ImportError:
        return False
    return True


def plan_volumes(cache_dir: Path, prefix: str, num_experts: int, out_dir: Path, ep_size: int,
                 samples: int, seq_length: int, global_batch: int) -> dict:
    """Plan on `samples` consecutive windows of the cache; return the volume ratios (lower is better)."""
    import numpy as np

    from megatron_grouter.data.routing_cache import open_cache
    from megatron_grouter.placement import PlannerSettings, make_plan

    cache = open_cache(cache_dir, prefix)
    samples = max(global_batch, samples // global_batch * global_batch)
    tokens = min(samples * seq_length, cache.indices.shape[0] // seq_length * seq_length)
    samples = tokens // seq_length // global_batch * global_batch
    topk_SLK = np.asarray(cache.indices[:samples * seq_length], dtype=np.int64).reshape(
        samples, seq_length, cache.topk)
    settings = PlannerSettings(ep_size=ep_size, global_batch=global_batch, ranks_per_node=ep_size,
                               search_samples=min(samples, 4096), report_samples=samples)
    plan, report = make_plan(topk_SLK, num_experts, settings, cache.manifest["grouter_fingerprint"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan_report.txt").write_text("\n".join(report.lines()) + "\n")
    return {"ep_size": ep_size, "samples": samples, **plan.stats}
