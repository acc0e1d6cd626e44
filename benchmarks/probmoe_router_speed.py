"""Speed of the ProbMoE router against megatron-core's TopKRouter, forward + backward, one process.

Two comparisons, each measured in the same process on the same inputs, median of --repeats:
1. Routers: our `ProbMoERouter` (exact-k; dynamic-k with --dynamic) against megatron-core's own
   `TopKRouter` (softmax top-k, no aux loss), both with the same gating weight, on hidden states
   [T, 1, H]: router forward, then backward of a fixed random projection of the probs.
2. Routing math alone: the router's product tree (`probmoe_tree.route`: sample + marginals +
   entropy in one pass, backward Cov(z)·v) + straight-through gates, against torch.topk + softmax
   over the chosen logits. On CPU both tree implementations are timed: the fused C kernel
   (`native`, what the router runs when it builds) and the torch tree (`torch`, the CUDA path and
   the fallback). `--method sequential` times the sequential DP (`probmoe_dp`, the tests' oracle)
   instead, `--method autograd` the sequential DP's marginals by autograd.
Default shapes: T=8192 tokens, E=64 and 128, k=8, hidden 512, fp32.

    python benchmarks/probmoe_router_speed.py [--tokens 8192] [--hidden 512] [--repeats 7] [--threads N]
        [--method tree|sequential|autograd] [--device cpu|cuda] [--dynamic KMIN]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable

import torch

from megatron_grouter.routing import probmoe_native
from megatron_grouter.routing.probmoe_dp import marginals, sample_subsets, sample_with_marginals, \
    straight_through_gates
from megatron_grouter.routing.probmoe_tree import route


def probmoe_step(logits_TE: torch.Tensor, k_min: int, k_max: int, method: str,
                 generator: torch.Generator) -> torch.Tensor:
    if method == "tree":
        result = route(logits_TE, k_min, k_max, sample=True, generator=generator)
        mask_TE, mu_TE = result.mask_TE, result.mu_TE
    elif method == "sequential":
        mask_TE, mu_TE = sample_with_marginals(logits_TE, k_min, k_max, generator=generator)
    else:
        mask_TE = sample_subsets(logits_TE, k_min, k_max, generator=generator)
        mu_TE = marginals(logits_TE, k_min, k_max, method=method)
    return straight_through_gates(logits_TE, mask_TE, mu_TE)


@contextlib.contextmanager
def tree_kernel(choice: str | None):
    """Run the block with MEGATRON_GROUTER_PROBMOE_KERNEL=choice (None: as it is)."""
    previous = os.environ.get(probmoe_native.ENV)
    if choice is not None:
        os.environ[probmoe_native.ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(probmoe_native.ENV, None)
        else:
            os.environ[probmoe_native.ENV] = previous


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


def router_pair(num_experts: int, k: int, hidden: int, k_min: int, device: torch.device):
    """(megatron TopKRouter, ProbMoERouter) sharing one gating weight."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_grouter.routing.probmoe_router import ProbMoERouter

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=8,
                               num_moe_experts=num_experts, moe_router_topk=k,
                               moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                               moe_router_dtype="fp32", use_cpu_initialization=device.type == "cpu")
    groups = get_default_pg_collection()
    topk = TopKRouter(config=config, pg_collection=groups).to(device)
    probmoe = ProbMoERouter(config=config, pg_collection=groups, k_min=k_min).to(device)
    probmoe.weight.data.copy_(topk.weight.data)
    return topk.train(), probmoe.train()


def time_router(router, hidden_T1H: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median seconds of router(hidden) and backward of a fixed projection of its probs."""
    probe = None
    times = []
    for attempt in range(warmup + repeats):
        router.zero_grad(set_to_none=True)
        leaf = hidden_T1H.detach().requires_grad_(True)
        if leaf.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        probs_TE, _ = router(leaf)
        if probe is None:
            probe = torch.randn_like(probs_TE)
        (probs_TE * probe).sum().backward()
        if leaf.is_cuda:
            torch.cuda.synchronize()
        if attempt >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dynamic", type=int, default=None, metavar="KMIN",
                        help="also time dynamic-k with range [KMIN, k]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--method", default="tree", choices=["tree", "sequential", "autograd"],
                        help="routing math of section 2 (section 1 always runs the router, i.e. the tree)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    native = device.type == "cpu" and probmoe_native.choice() != "torch" and probmoe_native.available()
    print(f"device={device} threads={torch.get_num_threads()} tokens={args.tokens} k={args.k} "
          f"hidden={args.hidden} method={args.method} fp32, median of {args.repeats}; the router's tree: "
          f"{'native CPU kernel' if native else 'torch'}"
          + ("" if native or device.type != "cpu" else f" ({probmoe_native.failure()})"))
    ranges = [(args.k, args.k)] + ([(args.dynamic, args.k)] if args.dynamic is not None else [])
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    init_distributed()  # megatron's routers read their process groups from parallel_state
    print("1. routers (gating linear + routing), forward + backward:")
    for num_experts in args.experts:
        hidden_T1H = torch.randn(args.tokens, 1, args.hidden, device=device, generator=generator)
        for k_min, k_max in ranges:
            topk_router, probmoe_router = router_pair(num_experts, k_max, args.hidden, k_min, device)
            baseline_s = time_router(topk_router, hidden_T1H, args.repeats)
            probmoe_s = time_router(probmoe_router, hidden_T1H, args.repeats)
            print(f"E={num_experts:4d} k=[{k_min},{k_max}]  ProbMoERouter {probmoe_s * 1e3:8.2f} ms   "
                  f"megatron TopKRouter {baseline_s * 1e3:7.2f} ms   ratio {probmoe_s / baseline_s:6.1f}x")
    shutdown_distributed()
    print("2. routing math only (logits in, gates out), forward + backward:")
    kernels = ["native", "torch"] if native and args.method == "tree" else [None]
    for num_experts in args.experts:
        logits_TE = torch.randn(args.tokens, num_experts, device=device, generator=generator) * 2.0
        baseline_s = time_fwd_bwd(lambda x: topk_softmax_step(x, args.k), logits_TE, args.repeats)
        for k_min, k_max in ranges:
            for kernel in kernels:
                label = f"probmoe/{kernel}" if kernel else f"probmoe/{args.method}"
                with tree_kernel(kernel):
                    probmoe_s = time_fwd_bwd(lambda x: probmoe_step(x, k_min, k_max, args.method, generator),  # noqa: B023
                                             logits_TE, args.repeats)
                print(f"E={num_experts:4d} k=[{k_min},{k_max}]  {label:<15} {probmoe_s * 1e3:8.2f} ms   "
                      f"topk-softmax {baseline_s * 1e3:7.2f} ms   ratio {probmoe_s / baseline_s:6.1f}x")


if __name__ == "__main__":
    main()
