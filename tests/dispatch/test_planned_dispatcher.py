"""The planned all-to-all dispatcher computes what megatron-core's allgather dispatcher computes.

Real MoELayers (megatron's experts; our hybrid router, or megatron's TopKRouter) in real gloo
process groups: outputs, input gradients and every parameter gradient (experts and gate) agree
to fp32 round-off, for EP=4 and EP=2 (two groups side by side), with and without an expert
permutation, with a host-side plan and with counts taken at run time, and when a rank sends
nothing to its peers, an expert receives nothing, or a rank's experts are idle. A plan that
disagrees with the routing stops the layer with a one-line error (verify mode).
"""

import torch
import torch.multiprocessing as mp

from megatron_grouter.dispatch.plan import DispatchPlan, routed_expert_counts
from megatron_grouter.runtime.distributed import free_port
from tests.dispatch.moe_layer_parity import CASES, parity_worker


def test_plan_splits_for_each_rank():
    # 2 EP ranks × 4 experts (2 local each). Rank 0 keeps everything local; expert 3 idle.
    plan = DispatchPlan(torch.tensor([[3, 1, 0, 0],
                                      [2, 0, 4, 0]]))
    rank0, rank1 = plan.for_rank(0), plan.for_rank(1)
    assert rank0.input_splits == [4, 0] and rank0.output_splits == [4, 2]
    assert rank1.input_splits == [2, 4] and rank1.output_splits == [0, 4]
    assert rank0.received_per_source_and_expert == [3, 1, 2, 0]
    assert rank0.tokens_per_local_expert.tolist() == [5, 1]
    assert rank1.tokens_per_local_expert.tolist() == [4, 0]
    assert plan.for_rank(0) is rank0  # computed once, shared by every layer


def test_counts_follow_the_expert_permutation_and_threshold():
    indices_TK = torch.tensor([[0, 1], [1, 2]])
    slot_of_expert = torch.tensor([2, 0, 1])
    assert routed_expert_counts(indices_TK, 3, slot_of_expert).tolist() == [2, 1, 1]
    weights_TK = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    # threshold 0.8: the first token keeps only its top expert
    assert routed_expert_counts(indices_TK, 3, None, weights_TK, 0.8).tolist() == [1, 1, 0]


def test_planned_dispatcher_matches_allgather_ep4_and_ep2():
    # 4 processes: one EP=4 group, then two EP=2 groups side by side. Forked, so the children
    # share the parent's imports (megatron takes ~12 s of CPU to import).
    mp.start_processes(parity_worker, args=(4, free_port(), [4, 2], [case.name for case in CASES]),
                       nprocs=4, join=True, start_method="spawn")
