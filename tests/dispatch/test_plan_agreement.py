"""Plans that cannot disagree: verify mode checks the whole plan across the EP group.

2 gloo processes, a real megatron MoELayer with the planned dispatcher, plans from an offline
book through the real DispatchPlanner. Rank 0's copy of rank 1's row moves one token between
two of rank 0's experts (the case per-layer checks cannot see: each rank's own row is right, and
the per-rank split sizes still match). Without the
cross-rank check the layer runs and rank 1's output silently differs from megatron's allgather
dispatcher; with it both ranks stop with one line naming the rank, the row and the expert. The
count exchange gives the same plans with one all-gather per step.
"""

import os
import numpy as np
import torch
import torch.multiprocessing as mp

from megatron_grouter.runtime.distributed import free_port
from tests.dispatch.moe_layer_parity import BATCH, HIDDEN, NUM_EXPERTS, SEQ, TOPK, build_layer


def routing_of(rank: int) -> torch.Tensor:
    scores_TE = torch.rand(SEQ * BATCH, NUM_EXPERTS, generator=torch.Generator().manual_seed(50 + rank))
    return scores_TE.argsort(dim=1)[:, :TOPK]


def agreement_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from megatron.core import parallel_state

    from megatron_grouter.dispatch import planner as planner_module
    from megatron_grouter.dispatch.plan import DispatchPlanMismatch, routed_expert_counts
    from megatron_grouter.dispatch.plan_book import DispatchPlanBook
    from megatron_grouter.dispatch.planner import DispatchPlanner
    from megatron_grouter.routing.context import RoutingContext
    from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    try:
        init_distributed(expert_parallel=2, num_experts=NUM_EXPERTS)
        group = parallel_state.get_expert_model_parallel_group()
        routing_context = RoutingContext()
        allgather_layer = build_layer(routing_context, 2)
        planned_layer = build_layer(routing_context, 2, planned=True)
        indices_BSK = routing_of(rank).view(SEQ, BATCH, TOPK).transpose(0, 1)
        routing = route_micro_batch(indices_BSK, torch.full(indices_BSK.shape, 1.0 / TOPK),
                                    RoutingRule(NUM_EXPERTS))
        hidden_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(7 + rank))

        counts_RE = torch.stack([routed_expert_counts(routing_of(peer), NUM_EXPERTS) for peer in range(2)])
        corrupted_RE = counts_RE.clone()
        if rank == 0:  # rank 0's copy of rank 1's row: one token moved between two of rank 0's
            # experts, so the split sizes still match (gloo would abort otherwise) but not the experts
            local_L = counts_RE[1, :NUM_EXPERTS // 2]
            a, b = int(local_L.argmax()), int(local_L.argmin())
            corrupted_RE[1, a] -= 1
            corrupted_RE[1, b] += 1
        book = DispatchPlanBook({}, corrupted_RE.numpy()[None, None, None].astype(np.int32))
        planner = DispatchPlanner(group, torch.device("cpu"), book=book)

        with routing_context.serving(routing):
            expected_SBH = allgather_layer(hidden_SBH)[0].detach()
        [plan] = planner.plans([routing], step=0, training=True)  # without verify: nothing stops it
        with routing_context.serving(routing.with_plan(plan)):
            silent = (planned_layer(hidden_SBH)[0].detach() - expected_SBH).abs().max().item()

        planner.verify = True
        try:
            planner.plans([routing], step=0, training=True)
            caught = None
        except DispatchPlanMismatch as error:
            caught = str(error)

        # the count exchange: the same plans as the uncorrupted table, one all-gather for the step
        calls = []
        original = planner_module.all_gather_single

        def counted(*args, **kwargs):
            calls.append("all_gather")
            return original(*args, **kwargs)

        planner_module.all_gather_single = counted
        planner.verify = False
        plans = planner.plans([routing, routing], step=0, training=False)
        planner_module.all_gather_single = original
        exchanged = all(torch.equal(plan.tokens_per_expert_RE, counts_RE) for plan in plans)
        results[rank] = {"silent": silent, "caught": caught, "exchanged": exchanged, "calls": len(calls)}
    finally:
        shutdown_distributed()


def test_cross_rank_corruption_of_a_peer_row_is_caught_and_named():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(agreement_worker, args=(free_port(), results), nprocs=2, join=True,
                           start_method="spawn")
        results = dict(results)
    assert results[1]["silent"] > 1e-3  # the case of the issue: wrong output, no error
    for rank in (0, 1):
        message = results[rank]["caught"]
        assert message is not None and "\n" not in message
        assert "EP rank 0 plans" in message and "from EP rank 1 to expert slot" in message
        assert results[rank]["exchanged"] and results[rank]["calls"] == 1
