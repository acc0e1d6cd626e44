"""Routers by `router.type`: how to build the class megatron's MoELayer instantiates, and which
TransformerConfig fields it needs.

megatron builds a router as `submodules.router(config=..., pg_collection=...)` (0.17+ also
passes `is_mtp_layer`); a router that needs more (the RoutingContext) is handed over as a
`functools.partial` in our layer spec (training/model.py). Adding a router touches only this table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.routing.metered_router import MeteredTopKRouter
from megatron_grouter.routing.preemptive_router import FixedRouter, HybridRouter


@dataclass(frozen=True)
class RouterKind:
    # (RouterConfig, RoutingContext) -> what MoESubmodules.router holds
    builder: Callable[[Any, RoutingContext], Callable]
    config_fields: Callable[[Any], dict]  # RouterConfig -> TransformerConfig kwargs
    preemptive: bool = False


def topk_config_fields(router) -> dict:
    load_balancing = router.load_balancing_type
    uses_aux_loss = load_balancing in ("aux_loss", "seq_aux_loss")
    return dict(
        moe_router_load_balancing_type=load_balancing,
        moe_aux_loss_coeff=router.aux_loss_coeff if uses_aux_loss else 0.0,
        moe_z_loss_coeff=router.z_loss_coeff,
        moe_router_enable_expert_bias=router.enable_expert_bias,
        moe_router_bias_update_rate=router.bias_update_rate,
        moe_router_score_function=router.score_function,
        moe_router_pre_softmax=router.pre_softmax,
        moe_router_topk_scaling_factor=router.topk_scaling_factor,
        moe_router_dtype="fp32",
    )


def no_balancing_fields(router) -> dict:
    # preemptive routers form their own gates, so megatron's top-1 guard (pre_softmax, which
    # they never read) must not refuse model.topk=1
    return dict(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                moe_z_loss_coeff=None, moe_router_dtype="fp32", moe_router_pre_softmax=True,
                moe_router_topk_scaling_factor=router.topk_scaling_factor)


def _preemptive(router_class):
    return lambda router, context: functools.partial(router_class, context=context)


def _warm_start(router, context):
    from megatron_grouter.routing.warm_router import WarmStartRouter

    return functools.partial(WarmStartRouter, context=context, warm_tokens=router.grouter.warm_tokens,
                             imitation_coeff=router.grouter.imitation_coeff)


def _probmoe(router, context):
    from megatron_grouter.routing.probmoe_router import ProbMoERouter

    return functools.partial(ProbMoERouter, k_min=router.probmoe.k_min,
                             inference_rule=router.probmoe.inference_rule,
                             temperature=router.probmoe.temperature,
                             count_cost=router.probmoe.count_cost)


_ROUTERS: dict[str, RouterKind] = {
    "topk": RouterKind(lambda router, context: MeteredTopKRouter, topk_config_fields),
    "grouter_fixed": RouterKind(_preemptive(FixedRouter), no_balancing_fields, preemptive=True),
    "grouter_hybrid": RouterKind(_preemptive(HybridRouter), no_balancing_fields, preemptive=True),
    "hash": RouterKind(_preemptive(HybridRouter), no_balancing_fields, preemptive=True),
    "probmoe": RouterKind(_probmoe, topk_config_fields),
    # learned (aux loss) after following the Grouter's routing for its first tokens
    "grouter_warm": RouterKind(_warm_start, topk_config_fields, preemptive=True),
}


def register_router(name: str, kind: RouterKind) -> None:
    _ROUTERS[name] = kind


def router_kind(name: str) -> RouterKind:
    if name not in _ROUTERS:
        raise UserError(f"router.type={name!r} is unknown; choose one of {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[name]
