"""Workers for the dispatcher parity tests: a real megatron MoELayer in every gloo process.

Each rank runs the same layer (same weights, same routing) once through megatron's allgather
dispatcher and once through the planned dispatcher, and compares outputs and gradients.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

HIDDEN, FFN, NUM_EXPERTS, TOPK = 16, 24, 8, 2
SEQ, BATCH = 6, 2


@dataclass(frozen=True)
class Case:
    name: str
    routing: str = "random"  # random | rank0_local: rank 0 keeps its tokens, the last expert idle
    #                          | first_rank_only: every token goes to EP rank 0's experts
    #                          | learned: megatron's TopKRouter picks (no plan possible)
    permuted: bool = False  # a non-identity slot_of_expert
    planned: bool = True  # plan given (else counted at run time)


CASES = [Case("plan"), Case("plan_permuted", permuted=True), Case("counted", planned=False),
         Case("counted_permuted", permuted=True, planned=False),
         Case("rank0_local", routing="rank0_local"),
         Case("rank0_local_counted", routing="rank0_local", planned=False),
         Case("first_rank_only", routing="first_rank_only"),
         Case("learned", routing="learned", planned=False)]


def source_routing(case: Case, ep_rank: int, ep_size: int, rank: int, num_tokens: int) -> torch.Tensor:
    """[T, k] source expert ids of global rank `rank`: any rank can compute any rank's (host only)."""
    generator = torch.Generator().manual_seed(1000 * CASES.index(case) + 10 * ep_size + rank)
    local = NUM_EXPERTS // ep_size
    if case.routing in ("random", "learned"):
        allowed = list(range(NUM_EXPERTS))
    elif case.routing == "rank0_local":
        allowed = list(range(local)) if ep_rank == 0 else list(range(NUM_EXPERTS - 1))
    else:
        allowed = list(range(local))
    scores_TA = torch.rand(num_tokens, len(allowed), generator=generator)
    return torch.tensor(allowed)[scores_TA.argsort(dim=1)[:, :TOPK]]


def slot_permutation(case: Case) -> torch.Tensor | None:
    return torch.randperm(NUM_EXPERTS, generator=torch.Generator().manual_seed(7)) if case.permuted else None


def build_layer(routing_context, ep_size: int, learned: bool = False, planned: bool = False,
                verify: bool = False):
    """One MoE layer as mg-train builds it (our spec: PluginMoELayer, our router) with megatron's
    allgather dispatcher, or with ours (`planned`); the same weights either way."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer import TransformerConfig

    from megatron_grouter.dispatch.planned_dispatcher import PlannedAllToAllDispatcher
    from megatron_grouter.megatron_compat import building_plugin_layers, plugin_moe_spec
    from megatron_grouter.routing.metered_router import MeteredTopKRouter
    from megatron_grouter.routing.preemptive_router import HybridRouter
    from megatron_grouter.training.moe_layer import PluginMoELayer

    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, num_moe_experts=NUM_EXPERTS,
        moe_ffn_hidden_size=FFN, moe_router_topk=TOPK, moe_token_dispatcher_type="allgather",
        expert_model_parallel_size=ep_size, use_cpu_initialization=True, add_bias_linear=False,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        bias_dropout_fusion=False, gradient_accumulation_fusion=False)
    # The hybrid router's gate is trainable, so the probs' gradient path is checked as well.
    router = MeteredTopKRouter if learned else functools.partial(HybridRouter, context=routing_context)
    dispatcher = {"dispatcher_builder": functools.partial(PlannedAllToAllDispatcher, context=routing_context,
                                                          verify=verify)} if planned else {}
    spec = plugin_moe_spec(get_moe_module_spec(use_te=False, num_experts=NUM_EXPERTS),
                           PluginMoELayer, router, **dispatcher)
    with building_plugin_layers():
        layer = spec(config=config)
    with torch.no_grad():  # distinct weights per rank and expert
        generator = torch.Generator().manual_seed(torch.distributed.get_rank())
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return layer


def forward_backward(layer, hidden_SBH, upstream_SBH):
    layer.zero_grad(set_to_none=True)
    inputs = hidden_SBH.clone().requires_grad_(True)
    output, _ = layer(inputs)
    (output * upstream_SBH).sum().backward()
    grads = {name: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
             for name, p in layer.named_parameters()}
    return output.detach(), inputs.grad, grads


def parity_worker(rank: int, world_size: int, port: int, ep_sizes: list[int],
                  case_names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    try:
        for ep_size in ep_sizes:  # EP < world size: several EP groups side by side
            init_distributed(expert_parallel=ep_size, num_experts=NUM_EXPERTS)
            for case in [case for case in CASES if case.name in case_names]:
                check_case(case, rank, ep_size)
    finally:
        shutdown_distributed()


def check_case(case: Case, rank: int, ep_size: int) -> None:
    from megatron.core import parallel_state

    from megatron_grouter.dispatch.plan import DispatchPlan, DispatchPlanMismatch, routed_expert_counts
    from megatron_grouter.routing.context import RoutingContext
    from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch

    num_tokens = SEQ * BATCH
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    ep_peers = torch.distributed.get_process_group_ranks(
        parallel_state.get_expert_model_parallel_group())
    slot_of_expert = slot_permutation(case)
    routing_context = RoutingContext()
    learned = case.routing == "learned"
    allgather_layer = build_layer(routing_context, ep_size, learned=learned)
    planned_layer = build_layer(routing_context, ep_size, learned=learned, planned=True, verify=True)

    indices_TK = source_routing(case, ep_rank, ep_size, rank, num_tokens)
    # batch-first [b, s, k] whose sequence-first flattening is indices_TK
    indices_BSK = indices_TK.view(SEQ, BATCH, TOPK).transpose(0, 1)
    routing = route_micro_batch(indices_BSK, torch.full(indices_BSK.shape, 1.0 / TOPK),
                                RoutingRule(NUM_EXPERTS, slot_of_expert))
    generator = torch.Generator().manual_seed(100 + rank)
    hidden_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    upstream_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)

    with routing_context.serving(None if learned else routing):
        expected = forward_backward(allgather_layer, hidden_SBH, upstream_SBH)
    counts_RE = torch.stack([
        routed_expert_counts(source_routing(case, peer_ep_rank, ep_size, peer, num_tokens),
                             NUM_EXPERTS, slot_of_expert)
        for peer_ep_rank, peer in enumerate(ep_peers)])
    assert torch.equal(counts_RE[ep_rank], routing.copies_E)  # one routing function for both
    served = None if learned else routing.with_plan(DispatchPlan(counts_RE) if case.planned else None)
    with routing_context.serving(served):
        actual = forward_backward(planned_layer, hidden_SBH, upstream_SBH)
    message = f"case {case.name}, EP={ep_size}, rank {rank}"
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6, msg=message)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-5, atol=1e-6, msg=message)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(actual[2][name], expected[2][name], rtol=1e-5, atol=1e-6,
                                   msg=f"{message}, grad of {name}")
    if case.routing == "first_rank_only" and ep_rank > 0:  # these experts saw no token
        assert all(not grad.any() for name, grad in actual[2].items() if "experts" in name)

    if case.planned:  # a plan that disagrees with the routing is one clear error
        wrong_RE = counts_RE.clone()
        wrong_RE[:, 0] += 1
        try:
            with routing_context.serving(routing.with_plan(DispatchPlan(wrong_RE))):
                planned_layer(hidden_SBH)
        except DispatchPlanMismatch as error:
            assert "out of step with the routing" in str(error) and "\n" not in str(error)
        else:
            raise AssertionError("a wrong plan was not caught")
