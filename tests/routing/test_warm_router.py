"""WarmStartRouter (router.type=grouter_warm) inside megatron-core's TopKRouter, one process, CPU:
it follows the served (Grouter) routing and learns to imitate it for its first warm_tokens training
tokens, then routes by its own top-k."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.microbatch import RoutingRule, route_micro_batch
from megatron_grouter.routing.warm_router import WarmStartRouter, imitation_loss
from megatron_grouter.runtime.cpu_compat import apply_cpu_compat

torch.set_num_threads(1)
SINGLE_RANK_GROUPS = SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
EXPERTS, TOPK, SEQ, BATCH, HIDDEN = 8, 2, 16, 4, 16


def make_router(warm_tokens: int, coeff: float = 1.0) -> tuple[WarmStartRouter, RoutingContext]:
    apply_cpu_compat()
    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, num_moe_experts=EXPERTS,
                               moe_router_topk=TOPK, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                               moe_router_dtype="fp32", add_bias_linear=False, moe_ffn_hidden_size=HIDDEN)
    context = RoutingContext()
    return WarmStartRouter(config, SINGLE_RANK_GROUPS, context=context, warm_tokens=warm_tokens,
                           imitation_coeff=coeff), context


def served(hidden_SBH: torch.Tensor) -> tuple:
    """A fixed 'Grouter': experts a function of the hidden state's sign pattern (learnable by a linear gate)."""
    projection = torch.randn(HIDDEN, EXPERTS, generator=torch.Generator().manual_seed(3))
    experts_BSK = (hidden_SBH.transpose(0, 1) @ projection).topk(TOPK, dim=-1).indices
    weights_BSK = torch.full(experts_BSK.shape, 1.0 / TOPK)
    return route_micro_batch(experts_BSK, weights_BSK, RoutingRule(EXPERTS)), experts_BSK.transpose(0, 1)


def hidden(seed: int) -> torch.Tensor:
    return torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_follows_and_learns_the_served_routing_then_routes_by_its_own_topk():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    tokens_per_batch = SEQ * BATCH
    router, context = make_router(warm_tokens=300 * tokens_per_batch)
    optimizer = torch.optim.Adam(router.parameters(), lr=3e-2)
    router.train()
    for step in range(300):
        inputs = hidden(step)
        routing, experts_SBK = served(inputs)
        with context.serving(routing):
            probs_TE, map_TE = router(inputs)
        chosen = torch.zeros(tokens_per_batch, EXPERTS, dtype=torch.bool).scatter(1, experts_SBK.reshape(-1, TOPK), True)
        assert torch.equal(map_TE, chosen)  # warm: exactly the served experts
        optimizer.zero_grad()
        (probs_TE * 0).sum().backward()  # only the imitation loss reaches the gate
        assert float(router.weight.grad.abs().sum()) > 0
        optimizer.step()
    assert router.tokens_routed == 300 * tokens_per_batch and not router.warm

    # Warm phase over: its own top-k, which now mostly agrees with the served routing.
    inputs = hidden(10_000)
    _, experts_SBK = served(inputs)
    with torch.no_grad():
        _, map_TE = router(inputs)  # no routing served: a learned router needs none
    assert bool((map_TE.sum(dim=1) == TOPK).all())
    chosen = torch.zeros_like(map_TE).scatter(1, experts_SBK.reshape(-1, TOPK), True)
    agreement = float((map_TE & chosen).sum()) / float(chosen.sum())
    assert agreement > 0.7  # chance: 2/8


def test_evaluation_during_warm_phase_follows_without_counting():
    router, context = make_router(warm_tokens=10)
    router.eval()
    inputs = hidden(0)
    routing, _ = served(inputs)
    with torch.no_grad(), context.serving(routing):
        router(inputs)
    assert router.tokens_routed == 0 and router.warm


def test_imitation_loss_is_cross_entropy_to_the_served_experts():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    slots = torch.tensor([[0], [1]])
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 1]) / 2
    assert float(imitation_loss(logits, slots, torch.ones(2, 1, dtype=torch.bool))) == pytest.approx(float(expected))
    masked = imitation_loss(logits, slots, torch.tensor([[True], [False]]))
    assert float(masked) == pytest.approx(float(-torch.log_softmax(logits, -1)[0, 0]))


def test_needs_a_warm_phase():
    with pytest.raises(UserError, match="warm_tokens=0"):
        make_router(warm_tokens=0)
