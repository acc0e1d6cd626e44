"""Host syncs per training step, by origin: ours (megatron_grouter) against megatron-core's own.

  python benchmarks/step_host_syncs.py [--steps 6] [--log-interval 3]

Runs mg-train under tests/training/sync_counting_train.py (runtime/host_syncs.py: host reads of
tensor values on the CPU, attributed to the innermost non-torch frame; host data by construction
is not counted) for three setups on a tiny model: cached Grouter routing with the planned
dispatcher (EP=2, 2 processes); the online Grouter (1 process); megatron's TopKRouter with aux
loss (1 process). Prints, per setup, the calls per step (mean over steps and ranks) of ours and of
megatron-core's, and the largest per-step count of ours (target 0: statistics are reduced at log
steps, outside the step). On a GPU, benchmarks/gpu_smoke.py checks the same with CUDA's sync
debug mode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_smoke  # noqa: E402  (its corpus and random-Grouter setup)


def counted_run(nproc: int, overrides: list[str], out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "tests.training.sync_counting_train", *overrides, f"train.out_dir={out}"],
                   cwd=REPO, env=env, check=True, capture_output=True, text=True)
    return [json.loads((out / f"host_syncs_rank{rank}.json").read_text()) for rank in range(nproc)]


def summarise(name: str, ranks: list[dict]) -> None:
    ours, megatrons, where = [], [], set()
    for per_step in ranks:
        for origins in per_step.values():
            ours.append(sum(calls for origin, calls in origins.items() if origin.startswith("megatron_grouter")))
            where.update(origin for origin in origins if origin.startswith("megatron_grouter"))
            megatrons.append(sum(calls for origin, calls in origins.items() if origin.startswith("megatron:")))
    print(f"{name:<42} ours {statistics.mean(ours):6.1f}/step (max {max(ours)})   "
          f"megatron-core {statistics.mean(megatrons):6.1f}/step"
          + (f"   ours at {', '.join(sorted(where))}" if where else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--log-interval", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        prepared = gpu_smoke.setup(out, cpu=True)
        common = [*prepared["data"], *gpu_smoke.TINY, f"train.steps={args.steps}", "train.warmup_steps=1",
                  f"train.log_interval={args.log_interval}", "train.eval_interval=0", "train.save_interval=-1"]
        online = [item.replace("source=cached", "source=online") for item in prepared["grouter"]
                  if not item.startswith("router.grouter.cache=")]
        summarise("cached Grouter, planned dispatcher, EP=2",
                  counted_run(2, [*common, *prepared["grouter"], "parallel=ep2_planned"], out / "planned"))
        summarise("online Grouter, 1 process", counted_run(1, [*common, *online], out / "online"))
        summarise("TopKRouter + aux loss, 1 process",
                  counted_run(1, [*common, "router=aux_loss", "model.num_experts=8", "model.topk=2"], out / "topk"))


if __name__ == "__main__":
    main()
