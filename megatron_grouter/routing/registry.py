"""Routers by name: the class plugged into MoESubmodules.router and its TransformerConfig fields.

A router type registers a `RouterKind`; the model builder asks the registry for the class and the
megatron TransformerConfig fields it needs, so adding a router touches no other module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from megatron_grouter.errors import UserError
from megatron_grouter.routing.metered_router import MeteredTopKRouter


@dataclass(frozen=True)
class RouterKind:
    router_class: type
    config_fields: Callable[[Any], dict]  # RouterConfig -> TransformerConfig kwargs


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


_ROUTERS: dict[str, RouterKind] = {
    "topk": RouterKind(MeteredTopKRouter, topk_config_fields),
}


def register_router(name: str, kind: RouterKind) -> None:
    _ROUTERS[name] = kind


def router_kind(name: str) -> RouterKind:
    if name not in _ROUTERS:
        raise UserError(f"router.type={name!r} is unknown; choose one of {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[name]
