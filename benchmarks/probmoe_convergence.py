"""Validation loss against tokens: ProbMoE (exact-k, dynamic-k) against the aux-loss router.

Every run trains the same model on the default corpus with the same data order, initialisation
and token budget for a given seed, in this invocation, one after the other (`mg-train` in a
subprocess each). Per seed it prints the validation-loss curve of each router against tokens, then
per router: final validation loss and its difference to aux_loss, the tokens it needs to reach
aux_loss's final loss ("not reached" otherwise), active experts per token over the last half of
training, training-time subset entropy (ProbMoE) and tokens/s as a ratio to aux_loss's. Last, the
issue's two questions answered over all seeds:
  exact-k   final validation loss <= aux_loss's on every seed?
  dynamic-k fewer active experts than k_max, at a final loss no worse than exact-k's, on every seed?
    (for each dynamic-k variant: probmoe_dynamic_k as the paper, probmoe_dynamic_k_cost with a price
    on the expected number of experts)

  .venv/bin/python benchmarks/probmoe_convergence.py                      # tiny_cpu, 300 steps, 2 seeds
  .venv/bin/python benchmarks/probmoe_convergence.py --steps 600 --eval-interval 50 model=tiny_qwen3
  .venv/bin/python benchmarks/probmoe_convergence.py --routers aux_loss probmoe_exact_k --seeds 1 -- model=tiny_qwen3
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from megatron_grouter.reproduce.metrics import RunMetrics, data_efficiency, last_half_mean, read_run, throughput

REPO = Path(__file__).resolve().parent.parent
ROUTERS = ("aux_loss", "probmoe_exact_k", "probmoe_dynamic_k", "probmoe_dynamic_k_cost")


def train(router: str, seed: int, steps: int, eval_interval: int, out_dir: Path, overrides: list[str],
          threads: int) -> RunMetrics:
    command = [sys.executable, "-m", "megatron_grouter.train", f"router={router}", f"train.seed={seed}",
               f"train.steps={steps}", f"train.eval_interval={eval_interval}", "train.save_interval=-1",
               "train.resume=none", f"train.out_dir={out_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{router} (seed {seed}) failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return read_run(out_dir, router)


def print_seed(seed: int, runs: dict[str, RunMetrics], num_experts: int, topk: int) -> None:
    names = list(runs)
    print(f"\n=== seed {seed}: validation loss against tokens")
    print(f"{'tokens':>10} " + " ".join(f"{name:>18}" for name in names))
    for row in range(min(len(run.evals) for run in runs.values())):
        print(f"{runs[names[0]].tokens[row]:>10.0f} " + " ".join(f"{runs[name].val_loss[row]:>18.4f}"
                                                               for name in names))
    baseline = runs[names[0]]
    print(f"against {baseline.name} (final validation loss {baseline.val_loss[-1]:.4f}):")
    max_entropy = math.log(math.comb(num_experts, topk))
    for name, run in runs.items():
        reached = data_efficiency(baseline, run)["candidate_tokens"]
        reach = "not reached" if reached is None else f"{reached:,.0f} tokens"
        active = last_half_mean(run, "moe/active_experts")
        entropy = last_half_mean(run, "moe/subset_entropy")
        entropy_text = "" if entropy is None else f"  subset entropy {entropy:.2f} (exact-k max {max_entropy:.2f})"
        active_text = "n/a" if active is None else f"{active:.2f}"
        print(f"  {name:<18} final {run.val_loss[-1]:.4f} ({run.val_loss[-1] - baseline.val_loss[-1]:+.4f})  "
              f"reaches {baseline.name}'s final loss: {reach}  active experts {active_text}/{topk}"
              f"{entropy_text}  tokens/s ratio {throughput(run) / throughput(baseline):.2f}x")


def verdicts(by_seed: dict[int, dict[str, RunMetrics]], topk: int) -> None:
    final = {seed: {name: float(run.val_loss[-1]) for name, run in runs.items()} for seed, runs in by_seed.items()}
    print("\n=== over all seeds")
    for name in next(iter(final.values())):
        values = [final[seed][name] for seed in final]
        print(f"  {name:<18} final validation loss mean {np.mean(values):.4f}  per seed "
              + ", ".join(f"{value:.4f}" for value in values))
    if all({"aux_loss", "probmoe_exact_k"} <= set(runs) for runs in final.values()):
        margins = [final[seed]["probmoe_exact_k"] - final[seed]["aux_loss"] for seed in final]
        answer = "yes" if all(margin <= 0 for margin in margins) else "no"
        print(f"  exact-k final loss <= aux_loss's on every seed: {answer} (exact-k − aux_loss: "
              + ", ".join(f"{margin:+.4f}" for margin in margins) + ")")
    dynamic = [name for name in next(iter(final.values())) if name.startswith("probmoe_dynamic_k")]
    for name in dynamic:
        if not all({"probmoe_exact_k", name} <= set(runs) for runs in final.values()):
            continue
        active = [last_half_mean(by_seed[seed][name], "moe/active_experts") for seed in final]
        margins = [final[seed][name] - final[seed]["probmoe_exact_k"] for seed in final]
        print(dynamic_k_verdict(name, active, margins, topk))


def dynamic_k_verdict(name: str, active: list[float | None], margins: list[float], topk: int) -> str:
    """The dynamic-k question's line: "yes" only when every seed used at least 1 % fewer experts than
    k_max (2.00 of 2 is not fewer) at a final loss no worse than exact-k's."""
    fewer = bool(active) and all(value is not None and value < 0.99 * topk for value in active)
    answer = "yes" if fewer and all(margin <= 0 for margin in margins) else "no"
    return (f"  {name}: fewer active experts than k_max={topk} at a loss no worse than exact-k, every seed: "
            f"{answer} (active " + ", ".join("n/a" if value is None else f"{value:.3f}" for value in active)
            + f"; {name} − exact: " + ", ".join(f"{margin:+.4f}" for margin in margins) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument("--routers", nargs="+", default=list(ROUTERS))
    parser.add_argument("--threads", type=int, default=2, help="OMP threads per training process")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (model, data, train)")
    args = parser.parse_args()
    from megatron_grouter.reproduce.pipeline import compose_target

    model = compose_target(args.overrides).model
    by_seed: dict[int, dict[str, RunMetrics]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            by_seed[seed] = {}
            for router in args.routers:
                print(f"training {router} (seed {seed}, {args.steps} steps) ...", flush=True)
                by_seed[seed][router] = train(router, seed, args.steps, args.eval_interval,
                                              Path(tmp) / f"{router}-s{seed}", args.overrides, args.threads)
            print_seed(seed, by_seed[seed], model.num_experts, model.topk)
    verdicts(by_seed, model.topk)


if __name__ == "__main__":
    main()
