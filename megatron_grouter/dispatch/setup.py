"""Turns `parallel.dispatcher=planned` into the trainer hook that plans each micro-batch."""

from __future__ import annotations

import logging

from megatron_grouter.dispatch.planning_hook import PlannedDispatchHook, expert_peer_dp_ranks

log = logging.getLogger("megatron_grouter")


def build_dispatch_hook(root, trainer, routing_hook) -> PlannedDispatchHook | None:
    """The planning hook, or None: learned routers leave the planned dispatchers to count."""
    if root.parallel.dispatcher != "planned":
        return None
    if routing_hook is None:
        log.info("planned dispatcher: router %s is learned, so each layer counts its tokens",
                 root.router.name)
        return None
    router = trainer.moe_layers[0].router  # every MoE layer maps experts to slots alike
    log.info("planned dispatcher: all-to-all splits planned on the host from %s routing%s",
             root.router.name, " (verified in every layer)" if root.parallel.verify_dispatch_plan else "")
    return PlannedDispatchHook(routing_hook, trainer.dispatch_context,
                               expert_peer_dp_ranks(trainer.layout.device), root.model.num_experts,
                               slot_of_expert=getattr(router, "slot_of_expert", None),
                               activation_threshold=getattr(router, "activation_threshold", None),
                               scaling_factor=getattr(router, "scaling_factor", 1.0))
