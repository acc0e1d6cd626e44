"""The planned-EP target run: grouter_tuned trained at EP=2 (2 CPU processes) under a plan.

mg-plan-ep plans the target run's own samples on the routing cache (with the dispatch plan book
for its micro-batch size and DP=2), then mg-train runs under torchrun with the plan and the
planned dispatcher (plans looked up, verified across ranks and in every layer). The report then
shows a plan in effect — the run's EP traffic and its loss next to the EP=1 grouter_tuned run of
the same seed — not volumes only. Not a target run of the comparison (same maths as
grouter_tuned, other layout), so it stays out of the headline.
"""

from __future__ import annotations

import json
from pathlib import Path

EP_SIZE = 2


def micro_batch_size(target) -> int:
    """The target's micro-batch size, capped so that 2 data-parallel ranks split the global batch."""
    return min(int(target.train.micro_batch_size), int(target.train.global_batch_size) // EP_SIZE)


def plan_ep_args(target, train_data: list[str], tuned: Path, cache: Path, seed: int, out: Path) -> list[str]:
    """mg-plan-ep overrides that rebuild the target run's GPTDataset (same sample order)."""
    train = target.train
    return [f"grouter={tuned}", f"cache={cache}", *train_data, f"data.split='{target.data.split}'",
            f"train.seq_length={train.seq_length}", f"train.global_batch_size={train.global_batch_size}",
            f"train.seed={seed}", f"train.steps={train.steps}", f"train.eval_iters={train.eval_iters}",
            f"train.micro_batch_size={micro_batch_size(target)}", f"ep_size={EP_SIZE}", f"dp_size={EP_SIZE}",
            "ranks_per_node=1", "progress=false", f"out={out}"]


def run_summary(run_dir: Path, plan_stats: dict) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [record for record in records if "ep/sends_rank" in record]
    evals = [record["val_loss"] for record in records if "val_loss" in record]
    return {"run": str(run_dir), "ep_size": EP_SIZE, "steps": len(steps),
            "final_val_loss": evals[-1] if evals else None,
            "ep_sends_rank": sum(record["ep/sends_rank"] for record in steps),
            "ep_tokens": sum(record["ep/tokens"] for record in steps),
            "planned_sends_ratio": plan_stats.get("ratios_to_default", {}).get("dedup_sends_rank")}


def report_line(summary: dict, tuned_val_loss: float | None) -> str:
    ratio = summary.get("planned_sends_ratio")
    reference = f" (EP=1 grouter_tuned: {tuned_val_loss:.4f})" if tuned_val_loss is not None else ""
    loss = summary.get("final_val_loss")
    return (f"Planned EP in effect: grouter_tuned trained at EP={summary['ep_size']} (2 processes) under the plan "
            f"with the planned dispatcher (offline dispatch plans): {summary['ep_sends_rank']} deduplicated sends "
            f"for {summary['ep_tokens']} tokens over {summary['steps']} steps"
            + (f", {ratio:.3f}x the default layout's on the planner's sample" if ratio is not None else "")
            + (f"; final validation loss {loss:.4f}{reference}" if loss is not None else "") + ".")
