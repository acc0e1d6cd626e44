"""Turns `parallel.dispatcher=planned` into the trainer hook that plans each micro-batch.

With a placement plan, cached routing, no dynamic activation threshold and the book mg-plan-ep
wrote beside the plan, training plans are looked up; otherwise counts are exchanged once per
micro-batch (planning_hook.py). The book must fit the run (plan_book.check_fits).
"""

from __future__ import annotations

import logging

from megatron_grouter.dispatch.plan_book import DispatchPlanBook, book_key, book_path
from megatron_grouter.dispatch.planning_hook import PlannedDispatchHook

log = logging.getLogger("megatron_grouter")


def load_book(root, trainer, training_plan, activation_threshold) -> DispatchPlanBook | None:
    """The run's offline dispatch plans, or None (then counts are exchanged), with the reason logged."""
    if training_plan is None:
        return None
    path = book_path(root.router.grouter.plan)
    why_not = ("routing is online, the book was counted from the cache" if root.router.grouter.source != "cached"
               else "the router drops experts below a dynamic threshold" if activation_threshold is not None
               else f"no dispatch plan book {path} (mg-plan-ep writes it)" if not path.is_file() else None)
    if why_not:
        log.info("planned dispatcher: %s; counts exchanged once per micro-batch", why_not)
        return None
    book = DispatchPlanBook.load(path)
    book.check_fits(book_key(training_plan.plan, root.train.micro_batch_size, trainer.dp_size), path)
    log.info("planned dispatcher: %d steps x %d micro-batches of dispatch plans looked up from %s",
             book.counts_QXMRE.shape[0], book.micro_batches, path)
    return book


def build_dispatch_hook(root, trainer, routing_hook, training_plan=None) -> PlannedDispatchHook | None:
    """The planning hook, or None: learned routers leave the planned dispatchers to count."""
    from megatron.core import parallel_state

    if root.parallel.dispatcher != "planned":
        return None
    if routing_hook is None:
        log.info("planned dispatcher: router %s is learned, so each layer counts its tokens",
                 root.router.name)
        return None
    router = trainer.moe_layers[0].router  # every MoE layer maps experts to slots alike
    threshold = getattr(router, "activation_threshold", None)
    book = load_book(root, trainer, training_plan, threshold)
    log.info("planned dispatcher: all-to-all splits planned on the host from %s routing%s",
             root.router.name, " (verified in every layer and across ranks)" if root.parallel.verify_dispatch_plan else "")
    return PlannedDispatchHook(routing_hook, trainer.dispatch_context, root.model.num_experts,
                               parallel_state.get_expert_model_parallel_group(), trainer.layout.device,
                               replica=trainer.dp_rank // root.parallel.expert, book=book,
                               slot_of_expert=getattr(router, "slot_of_expert", None),
                               activation_threshold=threshold,
                               scaling_factor=getattr(router, "scaling_factor", 1.0))
