"""EP dispatch volumes of the placement planner on synthetic routing, against Megatron's default.

Default layout: contiguous experts (expert e on rank e // (E/EP)) and samples split in batch
order. For each method (the paper's cluster + Hungarian grouping, token co-activation grouping,
and the joint search) it prints deduplicated sends, token-expert pairs leaving the rank and the
busiest rank's sends/receives as ratios to the default, the capacity-free relaxation of the same
groups (a lower bound for any equal-share placement under them) and the planner's wall time.

  .venv/bin/python benchmarks/ep_volume_synthetic.py                 # probe-like: E=32 K=4 EP=8
  .venv/bin/python benchmarks/ep_volume_synthetic.py --experts 128 --top-k 8 --ep 16 \\
      --samples 2048 --tokens 512 --global-batch 512                 # larger model
"""

from __future__ import annotations

import argparse
import time

from megatron_grouter.placement.planner import METHODS, PlannerSettings, make_plan
from megatron_grouter.placement.synthetic import mixed_skill_routing, planted_block_routing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routing", choices=("mixed", "planted"), default="mixed")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    if args.routing == "planted":
        topk_SLK, _ = planted_block_routing(args.samples, args.tokens, args.experts, args.top_k, seed=args.seed)
    else:
        topk_SLK = mixed_skill_routing(args.samples, args.tokens, args.experts, args.top_k,
                                       num_topics=max(16, args.experts // 4), num_skills=max(24, args.experts // 2),
                                       experts_per_skill=max(6, args.experts // 10), seed=args.seed)
    print(f"routing {args.routing}: {topk_SLK.shape} E={args.experts} EP={args.ep} "
          f"batch={args.global_batch} (generated in {time.perf_counter() - started:.1f}s)")
    print(f"{'method':<13}{'dedup':>8}{'pairs':>8}{'maxsend':>9}{'maxrecv':>9}{'relaxed':>9}{'seconds':>9}")
    for method in METHODS:
        settings = PlannerSettings(ep_size=args.ep, global_batch=args.global_batch, ranks_per_node=args.ranks_per_node,
                                   method=method, seed=args.seed)
        started = time.perf_counter()
        _, report = make_plan(topk_SLK, args.experts, settings, "synthetic")
        seconds = time.perf_counter() - started
        ratios = report.planned.ratios_to(report.default)
        relaxed = report.capacity_free_sends / report.default.dedup_sends_rank
        print(f"{method:<13}{ratios['dedup_sends_rank']:>8.3f}{ratios['pairs_leaving_rank']:>8.3f}"
              f"{ratios['max_sends_rank']:>9.3f}{ratios['max_recvs_rank']:>9.3f}{relaxed:>9.3f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
