"""MoE step time of the planned dispatcher against megatron-core's alltoall dispatcher.

A stack of MoE layers per EP rank and dispatcher (gloo on CPU, NCCL with one GPU per rank), all
with the same weights: megatron's MoELayer with its own dispatchers, our PluginMoELayer with the
planned dispatcher, built from megatron's layer spec like mg-train builds them; preemptive routing
(FixedRouter over a fixed random top-k, one `route_micro_batch` routing served to the layers as
the forward step does), forward + backward. Dispatchers interleaved step by step so that machine
noise hits them alike; the planning of the step's micro-batch runs inside the timed step (the
trainer's DispatchPlanner):
  planned   — offline plans (a DispatchPlanBook): the plan is looked up, no collective
  exchange  — the same dispatcher, counts all-gathered once per step for all layers
              (DispatchPlanner without a book: one all-gather per step)
  counted   — the planned dispatcher counting at run time in every layer (all-gather + host copy)
  alltoall  — megatron-core's MoEAlltoAllTokenDispatcher: the named baseline
  allgather — megatron-core's MoEAllGatherTokenDispatcher (the CPU default)
Prints, per EP size, the median step times, planned ÷ alltoall and exchange ÷ alltoall, and per
MoE layer the metadata collectives and device→host reads (step_counters.py) of each. Then,
unless --planner-samples 0, times the EP placement planner (placement.make_plan).

  .venv/bin/python benchmarks/dispatch.py                          # EP=2 and 4, 2048 tokens per rank
  .venv/bin/python benchmarks/dispatch.py --ep 4 --tokens 8192 --planner-samples 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.multiprocessing as mp

DISPATCHERS = ("planned", "exchange", "counted", "alltoall", "allgather")


def layer_config(args, dispatcher_type: str):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=4, num_moe_experts=args.experts,
        moe_ffn_hidden_size=args.ffn, moe_router_topk=args.topk, moe_token_dispatcher_type=dispatcher_type,
        expert_model_parallel_size=args.ep, use_cpu_initialization=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        bias_dropout_fusion=False, gradient_accumulation_fusion=False)


def build_layer(args, routing_context, dispatcher: str):
    """One MoE layer routed by the FixedRouter: megatron's own MoELayer with its allgather or
    alltoall dispatcher (picked by the config's moe_token_dispatcher_type), or — `planned` — our
    PluginMoELayer with the planned dispatcher, both built from megatron's layer spec the way
    mg-train builds them (megatron_compat.plugin_moe_spec)."""
    import functools

    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_grouter.dispatch.planned_dispatcher import PlannedAllToAllDispatcher
    from megatron_grouter.megatron_compat import building_plugin_layers, plugin_moe_spec
    from megatron_grouter.routing.preemptive_router import FixedRouter
    from megatron_grouter.training.moe_layer import PluginMoELayer

    mlp_spec = get_moe_module_spec(use_te=False, num_experts=args.experts)
    router = functools.partial(FixedRouter, context=routing_context)
    if dispatcher == "planned":
        spec = plugin_moe_spec(mlp_spec, PluginMoELayer, router, dispatcher_builder=functools.partial(
            PlannedAllToAllDispatcher, context=routing_context))
        config = layer_config(args, "allgather")  # replaced by the dispatcher_builder's
    else:
        spec = plugin_moe_spec(mlp_spec, MoELayer, router)
        config = layer_config(args, dispatcher)
    with building_plugin_layers():
        return spec(config=config)


STACK_OF = {"planned": "planned", "exchange": "planned", "counted": "planned",
            "alltoall": "alltoall", "allgather": "allgather"}


class LayerStacks:
    """`layers` MoE layers per dispatcher, routed by indices_TK/weights_TK, with identical weights:
    megatron's MoELayer with its allgather and its alltoall dispatcher, and PluginMoELayer with the
    planned dispatcher (shared by planned, exchange and counted: they differ only in the plan they
    serve). A dispatcher cannot be swapped into a built layer, so each has its own stack; the
    weights of the allgather stack are copied into the others (state_dict)."""

    def __init__(self, args, device: torch.device, indices_TK: torch.Tensor, weights_TK: torch.Tensor,
                 layers: int = 1):
        from megatron_grouter.routing.context import RoutingContext
        from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch

        self.routing_context = RoutingContext()
        kinds = ("allgather", "alltoall", "planned") if args.ep > 1 else ("allgather", "planned")
        self.stacks = {kind: torch.nn.ModuleList(build_layer(args, self.routing_context, kind)
                                                 for _ in range(layers)).to(device) for kind in kinds}
        if "alltoall" not in self.stacks:  # EP=1: megatron's alltoall is its allgather
            self.stacks["alltoall"] = self.stacks["allgather"]
        reference = self.stacks["allgather"].state_dict()
        for kind in kinds[1:]:
            self.stacks[kind].load_state_dict(reference)
        # one micro-batch, batch-first [b=1, s=T, k] as a source gives it: sequence-first [T, 1, k]
        self.host_routing = route_micro_batch(indices_TK.view(1, -1, indices_TK.shape[-1]),
                                              weights_TK.view(1, -1, weights_TK.shape[-1]),
                                              RoutingRule(args.experts))
        self.routing = self.host_routing.to(device)  # what the forward step serves

    def stack(self, name: str) -> torch.nn.ModuleList:
        return self.stacks[STACK_OF[name]]

    def forward(self, name: str, hidden_TBH: torch.Tensor, plan=None) -> torch.Tensor:
        """The stack of dispatcher `name` on `hidden_TBH`, serving the routing (with `plan`)."""
        with self.routing_context.serving(self.routing.with_plan(plan)):
            for layer in self.stack(name):
                hidden_TBH = layer(hidden_TBH)[0]
        return hidden_TBH


def rank_routing(args, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    return torch.rand(args.tokens, args.experts, generator=generator).argsort(dim=1)[:, :args.topk]


def worker(rank: int, args, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.ep))
    torch.set_num_threads(args.threads)
    import torch.distributed as dist

    import step_counters

    step_counters.wrap_collectives()  # before megatron_grouter binds its aliases
    import numpy as np

    from megatron.core import parallel_state

    from megatron_grouter.dispatch.plan import routed_expert_counts
    from megatron_grouter.dispatch.plan_book import DispatchPlanBook
    from megatron_grouter.dispatch.planner import DispatchPlanner
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    layout = init_distributed(expert_parallel=args.ep, num_experts=args.experts)
    try:
        counts_RE = torch.stack([routed_expert_counts(rank_routing(args, peer), args.experts)
                                 for peer in range(args.ep)])
        book = DispatchPlanBook({}, counts_RE.numpy()[None, None, None].astype(np.int32))
        indices_TK = rank_routing(args, rank)
        weights_TK = torch.full((args.tokens, args.topk), 1.0 / args.topk)
        stacks = LayerStacks(args, layout.device, indices_TK, weights_TK, args.layers)
        assert torch.equal(stacks.host_routing.copies_E, counts_RE[rank])  # the book fits the routing
        group = parallel_state.get_expert_model_parallel_group()
        # the trainer's planning of a step's micro-batches (here one), inside the timed step
        planners = {"planned": DispatchPlanner(group, layout.device, book=book),
                    "exchange": DispatchPlanner(group, layout.device)}
        hidden_TBH = torch.randn(args.tokens, 1, args.hidden, device=layout.device)

        def run(name: str) -> None:
            planner = planners.get(name)
            plan = None if planner is None else planner.plans([stacks.host_routing], step=0, training=True)[0]
            inputs = hidden_TBH.clone().requires_grad_(True)
            stacks.forward(name, inputs, plan).float().square().mean().backward()

        def step(name: str) -> float:
            dist.barrier()
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            run(name)
            if layout.device.type == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            return time.perf_counter() - started

        def counters(name: str) -> dict:
            step_counters.collective_calls.clear()
            tokens = stacks.routing.tokens_SBK
            sources = [hidden_TBH, *stacks.stack(name).parameters(), tokens.slots, tokens.weights, tokens.routed]
            with step_counters.HostReads(sources) as reads:
                run(name)
            calls = dict(step_counters.collective_calls)
            return {"metadata": calls.get("metadata", 0) / args.layers, "tokens": calls.get("tokens", 0) / args.layers,
                    "host_reads": reads.reads / args.layers}

        counts = {name: counters(name) for name in DISPATCHERS}
        times = {name: [] for name in DISPATCHERS}
        for iteration in range(args.warmup + args.steps):
            for name in DISPATCHERS:
                seconds = step(name)
                if iteration >= args.warmup:
                    times[name].append(seconds)
        if rank == 0:
            results.update({name: statistics.median(values) for name, values in times.items()})
            results["counts"] = counts
            results["splits"] = book.plan_at(0, 0, 0).for_rank(0).input_splits
    finally:
        shutdown_distributed()


def report(args, results: dict) -> None:
    splits, counts = results["splits"], results["counts"]
    print(f"EP={args.ep}: {args.layers} MoE layers fwd+bwd, {args.tokens} tokens/rank, hidden {args.hidden}, "
          f"ffn {args.ffn}, E={args.experts} top-{args.topk}, median of {args.steps} steps; token copies rank 0 "
          f"sends to peers per layer and direction: {sum(splits) - splits[0]}")
    print(f"  {'dispatcher':<10} {'step ms':>9} {'÷ alltoall':>11} {'metadata coll./layer':>21} "
          f"{'token coll./layer':>18} {'host reads/layer':>17}")
    for name in DISPATCHERS:
        c = counts[name]
        print(f"  {name:<10} {results[name] * 1e3:9.2f} {results[name] / results['alltoall']:11.3f} "
              f"{c['metadata']:21.2f} {c['tokens']:18.2f} {c['host_reads']:17.2f}")
    print(f"  ratios (baseline megatron alltoall): planned/alltoall {results['planned'] / results['alltoall']:.3f}  "
          f"exchange/alltoall {results['exchange'] / results['alltoall']:.3f}  "
          f"counted/alltoall {results['counted'] / results['alltoall']:.3f}")


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
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--layers", type=int, default=4, help="MoE layers per step (share one plan)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (s·b)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--planner-samples", type=int, default=1_000_000)
    parser.add_argument("--planner-tokens", type=int, default=64)
    parser.add_argument("--planner-ep", type=int, default=8)
    parser.add_argument("--planner-batch", type=int, default=256)
    args = parser.parse_args()

    from megatron_grouter.runtime.distributed import free_port

    for ep in args.ep:
        run_args = argparse.Namespace(**{**vars(args), "ep": ep})
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(worker, args=(run_args, free_port(), results), nprocs=ep, join=True)
            report(run_args, dict(results))
    if args.planner_samples > 0:
        time_planner(args.planner_samples, args.planner_tokens, args.experts, args.topk,
                     args.planner_ep, args.planner_batch)


if __name__ == "__main__":
    main()
