"""Speed of ProbMoE routing math against plain softmax top-k, forward + backward, one process.

ProbMoE step: marginals + exact sample (sharing one DP table) + straight-through gates, then a
backward of a random linear function of the gates. Baseline: torch.topk + softmax over the chosen
logits + the same backward. Both run on the same logits in the same process; the script prints
the median time of each and their ratio. Default shapes: T=8192 tokens, E=64 and 128, k=8, fp32.

    python benchmarks/probmoe_router_speed.py [--tokens 8192] [--repeats 7] [--threads N]
        [--method forward_backward|autograd] [--device cpu|cuda] [--dynamic KMIN]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from megatron_grouter.routing.probmoe_dp import marginals, sample_subsets, sample_with_marginals, \
    straight_through_gates


def probmoe_step(logits_TE: torch.Tensor, k_min: int, k_max: int, method: str,
                 generator: torch.Generator) -> torch.Tensor:
    if method == "forward_backward":
        mask_TE, mu_TE = sample_with_marginals(logits_TE, k_min, k_max, generator=generator)
    else:
        mask_TE = sample_subsets(logits_TE, k_min, k_max, generator=generator)
        mu_TE = marginals(logits_TE, k_min, k_max, method=method)
    return straight_through_gates(logits_TE, mask_TE, mu_TE)


def topk_softmax_step(logits_TE: torch.Tensor, k: int) -> torch.Tensor:
    top_TK, index_TK = torch.topk(logits_TE, k, dim=1)
    return torch.zeros_like(logits_TE).scatter(1, index_TK, torch.softmax(top_TK, dim=1))


def time_fwd_bwd(step: Callable[[torch.Tensor], torch.Tensor], logits_TE: torch.Tensor,
                 repeats: int, warmup: int = 2) -> float:
    """Median seconds of step(logits) followed by backward of a fixed random projection."""
    probe_TE = torch.randn_like(logits_TE)
    times = []
    for attempt in range(warmup + repeats):
        leaf_TE = logits_TE.detach().requires_grad_(True)
        if leaf_TE.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        (step(leaf_TE) * probe_TE).sum().backward()
        if leaf_TE.is_cuda:
            torch.cuda.synchronize()
        if attempt >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dynamic", type=int, default=None, metavar="KMIN",
                        help="also time dynamic-k with range [KMIN, k]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--method", default="forward_backward", choices=["forward_backward", "autograd"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} tokens={args.tokens} k={args.k} "
          f"method={args.method} fp32, median of {args.repeats}")
    ranges = [(args.k, args.k)] + ([(args.dynamic, args.k)] if args.dynamic is not None else [])
    for num_experts in args.experts:
        logits_TE = torch.randn(args.tokens, num_experts, device=device, generator=generator) * 2.0
        baseline_s = time_fwd_bwd(lambda x: topk_softmax_step(x, args.k), logits_TE, args.repeats)
        for k_min, k_max in ranges:
            probmoe_s = time_fwd_bwd(lambda x: probmoe_step(x, k_min, k_max, args.method, generator),
                                     logits_TE, args.repeats)
            print(f"E={num_experts:4d} k=[{k_min},{k_max}]  probmoe {probmoe_s * 1e3:8.2f} ms   "
                  f"topk-softmax {baseline_s * 1e3:7.2f} ms   ratio {probmoe_s / baseline_s:6.1f}x")


if __name__ == "__main__":
    main()
