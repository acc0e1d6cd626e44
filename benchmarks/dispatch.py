"""MoE-layer step time of the planned dispatcher against megatron-core's allgather dispatcher.

One megatron MoELayer per EP rank (gloo on CPU, NCCL with one GPU per rank), preemptive routing
(FixedRouter over a fixed random top-k), forward + backward. Three dispatchers on the same layer,
interleaved step by step so that machine noise hits them alike:
  planned  — plan given (host-side counts: no count collective, no device→host sync)
  counted  — the same dispatcher counting tokens per expert at run time (all-gather + host copy)
  allgather — megatron-core's MoEAllGatherTokenDispatcher (the CPU default)
Prints the median step time of each and the ratios measured in this run. Then, unless
--planner-samples 0, times the EP placement planner (placement.make_plan) on synthetic routing.

  .venv/bin/python benchmarks/dispatch.py                         # EP=2, 4096 tokens per rank, top-2
  .venv/bin/python benchmarks/dispatch.py --tokens 8192 --hidden 512 --planner-samples 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

DISPATCHERS = ("planned", "counted", "allgather")


def build_layer(args, routing_context):
    import functools

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatron_grouter.routing.preemptive_router import FixedRouter

    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=4, num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.ffn, moe_router_topk=args.topk, moe_token_dispatcher_type="allgather",
        expert_model_parallel_size=args.ep, use_cpu_initialization=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        bias_dropout_fusion=False, gradient_accumulation_fusion=False)
    spec = get_moe_module_spec(use_te=False, num_experts=args.experts, moe_grouped_gemm=False)
    spec.submodules.router = functools.partial(FixedRouter, context=routing_context)
    return build_module(spec, config=config)


def switchable_layer(args, device, indices_TK: torch.Tensor, weights_TK: torch.Tensor, plan):
    """An MoE layer routed by indices_TK/weights_TK, and `use(name)` that picks its dispatcher:
    planned (given `plan`), counted (planned dispatcher without a plan) or megatron's allgather."""
    from megatron_grouter.dispatch.context import DispatchContext
    from megatron_grouter.dispatch.planned_dispatcher import install_planned_dispatchers
    from megatron_grouter.routing.context import Routing, RoutingContext

    routing_context = RoutingContext()
    layer = build_layer(args, routing_context).to(device)
    allgather = layer.token_dispatcher
    dispatch_context = DispatchContext()
    install_planned_dispatchers(layer, dispatch_context)
    planned = layer.token_dispatcher
    routing_context.set(Routing(indices_TK.view(args.tokens, 1, args.topk).to(device),
                                weights_TK.view(args.tokens, 1, args.topk).to(device)))

    def use(name: str) -> None:
        layer.token_dispatcher = allgather if name == "allgather" else planned
        if name == "planned":
            dispatch_context.set(plan)
        else:
            dispatch_context.clear()

    return layer, use


def rank_routing(args, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.rand(args.tokens, args.experts, generator=generator).argsort(dim=1)[:, :args.topk]


def worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.ep))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    from megatron_grouter.dispatch.plan import DispatchPlan, routed_expert_counts
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    layout = init_distributed(expert_parallel=args.ep, num_experts=args.experts)
    try:
        plan = DispatchPlan(torch.stack([routed_expert_counts(rank_routing(args, peer), args.experts)
                                         for peer in range(args.ep)]))
        layer, use = switchable_layer(args, layout.device, rank_routing(args, rank),
                                      torch.full((args.tokens, args.topk), 1.0 / args.topk), plan)
        hidden_TBH = torch.randn(args.tokens, 1, args.hidden, device=layout.device)

        def step(name: str) -> float:
            use(name)
            dist.barrier()
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            inputs = hidden_TBH.clone().requires_grad_(True)
            output, _ = layer(inputs)
            output.float().square().mean().backward()
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            return time.perf_counter() - started

        times = {name: [] for name in DISPATCHERS}
        for iteration in range(args.warmup + args.steps):
            for name in DISPATCHERS:
                seconds = step(name)
                if iteration >= args.warmup:
                    times[name].append(seconds)
        if rank == 0:
            results.update({name: statistics.median(values) for name, values in times.items()})
            results["splits"] = plan.for_rank(0).input_splits
    finally:
        shutdown_distributed()


def time_planner(samples: int, tokens: int, experts: int, topk: int, ep: int, batch: int) -> None:
    import numpy as np

    from megatron_grouter.placement.planner import PlannerSettings, make_plan
    from megatron_grouter.placement.synthetic import planted_block_routing

    # Generating 1M samples at once needs [S·L, E] float64 logits; tile a 64k-sample block instead
    # (the planner's cost depends on the sizes, and the tiles keep the planted structure).
    block = min(samples, 65_536)
    routing_SLK, _ = planted_block_routing(block, tokens, experts, topk, seed=0)
    routing_SLK = np.tile(routing_SLK, (-(-samples // block), 1, 1))[:samples]
    settings = PlannerSettings(ep_size=ep, global_batch=batch, ranks_per_node=ep)
    started = time.perf_counter()
    _, report = make_plan(routing_SLK, experts, settings, "synthetic")
    seconds = time.perf_counter() - started
    ratio = report.planned.ratios_to(report.default)["dedup_sends_rank"]
    steps = ", ".join(f"{name} {value:.1f}s" for name, value in report.seconds.items())
    print(f"planner (make_plan, method {settings.method}): {samples:,} samples × {tokens} tokens, "
          f"E={experts} top-{topk} EP={ep} batch {batch}: {seconds:.1f}s wall ({steps}); "
          f"deduplicated sends {ratio:.3f}× the default layout's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank (s·b)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2, help="top-k = EP: both move equal rows")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--planner-samples", type=int, default=1_000_000)
    parser.add_argument("--planner-tokens", type=int, default=64)
    parser.add_argument("--planner-ep", type=int, default=8)
    parser.add_argument("--planner-batch", type=int, default=256)
    args = parser.parse_args()

    from megatron_grouter.runtime.distributed import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, free_port(), results), nprocs=args.ep, join=True)
        results = dict(results)
    splits = results["splits"]
    # all-to-all moves token copies (one per routed expert); allgather moves every token once.
    print(f"MoE layer fwd+bwd, EP={args.ep}, {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"ffn {args.ffn}, E={args.experts} top-{args.topk}, median of {args.steps} steps; rows "
          f"rank 0 sends to peers per direction: all-to-all {sum(splits) - splits[0]}, allgather "
          f"{args.tokens * (args.ep - 1)}:")
    for name in DISPATCHERS:
        print(f"  {name:<10} {results[name] * 1e3:8.2f} ms")
    print(f"  ratios: allgather/planned {results['allgather'] / results['planned']:.3f}  "
          f"counted/planned {results['counted'] / results['planned']:.3f}  "
          f"allgather/counted {results['allgather'] / results['counted']:.3f}")
    if args.planner_samples > 0:
        time_planner(args.planner_samples, args.planner_tokens, args.experts, args.topk,
                     args.planner_ep, args.planner_batch)


if __name__ == "__main__":
    main()
