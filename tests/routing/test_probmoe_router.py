"""ProbMoERouter inside megatron-core's router machinery (TopKRouter subclass), one process, CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_grouter.errors import UserError
from megatron_grouter.routing.probmoe_router import ProbMoERouter
from megatron_grouter.runtime.cpu_compat import apply_cpu_compat

torch.set_num_threads(1)

# no aux loss or z-loss here, so the router never reduces over these groups
SINGLE_RANK_GROUPS = SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)


def router_config(topk: int = 4, **overrides) -> TransformerConfig:
    fields = dict(num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=8,
                  moe_router_topk=topk, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                  moe_router_dtype="fp32", add_bias_linear=False)
    fields.update(overrides)
    return TransformerConfig(**fields)


def make_router(k_min=None, **overrides) -> ProbMoERouter:
    apply_cpu_compat()
    torch.manual_seed(0)
    return ProbMoERouter(router_config(**overrides), SINGLE_RANK_GROUPS, k_min=k_min,
                         generator=torch.Generator().manual_seed(0))


def hidden(seq: int = 6, batch: int = 3) -> torch.Tensor:
    return torch.randn(seq, batch, 16, generator=torch.Generator().manual_seed(1))


def test_training_routes_exactly_k_experts_and_trains_the_gate_through_the_marginals():
    router = make_router()
    router.train()
    probs_TE, routing_map_TE = router(hidden())
    assert probs_TE.shape == routing_map_TE.shape == (18, 8)
    assert bool((routing_map_TE.sum(dim=1) == 4).all())
    assert bool((probs_TE[~routing_map_TE] == 0).all())
    torch.testing.assert_close(probs_TE.sum(dim=1), torch.ones(18))  # pre_softmax False: renormalised
    (probs_TE * torch.randn_like(probs_TE)).sum().backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0
    assert float(router.load_meter.take().sum()) == 18 * 4


def test_dynamic_k_stays_in_range_and_evaluation_is_deterministic():
    router = make_router(k_min=2, topk=5)
    router.train()
    _, routing_map_TE = router(hidden(32, 4))
    sizes_T = routing_map_TE.sum(dim=1)
    assert bool(((sizes_T >= 2) & (sizes_T <= 5)).all())
    router.eval()
    with torch.no_grad():
        first_TE, first_map_TE = router(hidden(32, 4))
        second_TE, second_map_TE = router(hidden(32, 4))
    assert torch.equal(first_map_TE, second_map_TE) and torch.equal(first_TE, second_TE)
    eval_sizes_T = first_map_TE.sum(dim=1)
    assert bool(((eval_sizes_T >= 2) & (eval_sizes_T <= 5)).all())


def test_pre_softmax_gives_the_official_unnormalised_gates():
    router = make_router(moe_router_pre_softmax=True)
    router.eval()
    x = hidden()
    with torch.no_grad():
        probs_TE, routing_map_TE = router(x)
        logits_TE = router.gating(x).view(-1, 8)
    torch.testing.assert_close(probs_TE, torch.softmax(logits_TE, dim=1) * routing_map_TE)


@pytest.mark.parametrize("overrides", [dict(moe_router_score_function="sigmoid"), dict(topk=9)])
def test_unsupported_settings_are_refused(overrides):
    with pytest.raises(UserError):
        make_router(**overrides)
    with pytest.raises(UserError):
        make_router(k_min=5, topk=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_router_never_synchronises_with_the_host_on_cuda():
    router = make_router(k_min=2, topk=4).cuda().train()
    x = hidden().cuda().requires_grad_(True)
    router.generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        probs_TE, _ = router(x)
        probs_TE.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _mean_size_after_steps(count_cost: float, steps: int = 60) -> float:
    """Train only the router to follow a fixed random target through its gates, with count_cost."""
    router = make_router(k_min=1, topk=4, moe_router_load_balancing_type="none")
    router.count_cost = count_cost
    router.train()
    optimizer = torch.optim.SGD(router.parameters(), lr=0.5)
    target = torch.randn(18, 8, generator=torch.Generator().manual_seed(3))
    sizes = []
    for _ in range(steps):
        optimizer.zero_grad()
        probs_TE, routing_map_TE = router(hidden())
        (probs_TE * target).sum().backward()  # megatron's aux-loss scaler adds the count cost's gradient
        optimizer.step()
        sizes.append(float(routing_map_TE.sum(dim=1).float().mean()))
    return sum(sizes[-10:]) / 10


def test_count_cost_lowers_the_number_of_sampled_experts():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    free, priced = _mean_size_after_steps(0.0), _mean_size_after_steps(1.0)
    assert priced < free - 0.5, (free, priced)
    assert priced >= 1.0


def test_count_cost_is_refused_for_exact_k_and_when_negative():
    with pytest.raises(UserError, match="count_cost"):
        ProbMoERouter(router_config(), SINGLE_RANK_GROUPS, count_cost=0.1)
    with pytest.raises(UserError, match="count_cost"):
        ProbMoERouter(router_config(), SINGLE_RANK_GROUPS, k_min=1, count_cost=-1.0)
