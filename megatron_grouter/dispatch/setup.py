"""Turns `parallel.dispatcher=planned` into the planner that gives each micro-batch its plan.

With a placement plan, cached routing, no dynamic activation threshold and the book mg-plan-ep
wrote beside the plan, training plans are looked up; otherwise counts are exchanged once per
step (planner.py). The book must fit the run (plan_book.check_fits).
"""

from __future__ import annotations

import logging

import torch

from megatron_grouter.dispatch.plan_book import DispatchPlanBook, book_key, book_path
from megatron_grouter.dispatch.planner import DispatchPlanner
from megatron_grouter.runtime.host_groups import host_twin

log = logging.getLogger("megatron_grouter")


def load_book(root, trainer, training_plan, activation_threshold) -> DispatchPlanBook | None:
    """The run's offline dispatch plans, or None (then counts are exchanged), with the reason logged."""
    if training_plan is None:
        return None
    path = book_path(root.router.grouter.plan)
    why_not = ("tensor parallelism splits each micro-batch over TP ranks, the book plans whole micro-batches"
               if root.parallel.tensor > 1
               else "routing is online, the book was counted from the cache" if root.router.grouter.source != "cached"
               else "the router drops experts below a dynamic threshold" if activation_threshold is not None
               else f"no dispatch plan book {path} (mg-plan-ep writes it)" if not path.is_file() else None)
    if why_not:
        log.info("planned dispatcher: %s; counts exchanged once per step", why_not)
        return None
    book = DispatchPlanBook.load(path)
    book.check_fits(book_key(training_plan.plan, root.train.micro_batch_size, trainer.dp_size), path)
    log.info("planned dispatcher: %d steps x %d micro-batches of dispatch plans looked up from %s",
             book.counts_QXMRE.shape[0], book.micro_batches, path)
    return book


def build_dispatch_planner(root, trainer, rule, training_plan=None) -> DispatchPlanner | None:
    """The planner for routing by `rule` (routing.microbatch.RoutingRule), or None: learned
    routers (no rule) leave the planned dispatchers to count."""
    from megatron.core import parallel_state

    if root.parallel.dispatcher != "planned":
        return None
    if rule is None:
        log.info("planned dispatcher: router %s is learned, so each layer counts its tokens",
                 root.router.name)
        return None
    book = load_book(root, trainer, training_plan, rule.activation_threshold)
    log.info("planned dispatcher: all-to-all splits planned on the host from %s routing%s",
             root.router.name, " (verified in every layer and across ranks)" if root.parallel.verify_dispatch_plan else "")
    sequence_parallel = root.parallel.sequence_parallel and root.parallel.tensor > 1
    # counts are host data: exchanged over a gloo twin of the EP group, never through the GPU
    return DispatchPlanner(host_twin(parallel_state.get_expert_model_parallel_group()), torch.device("cpu"),
                           replica=trainer.dp_rank // root.parallel.expert, book=book,
                           verify=root.parallel.verify_dispatch_plan,
                           sequence_shards=root.parallel.tensor if sequence_parallel else 1,
                           sequence_rank=parallel_state.get_tensor_model_parallel_rank())
