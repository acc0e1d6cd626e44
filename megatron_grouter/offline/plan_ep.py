"""mg-plan-ep: an EP placement plan for an mg-train run, from the routing cache of its Grouter.

Rebuilds the run's GPTDataset (same prefix, split, seq_length, seed and sample count, so the
same sample order as mg-train), reads every training sample's top-k experts from the cache,
runs the planner (placement/planner.py) and saves the plan with the cache's fingerprint and the
sample order's. Prints the plan's dispatch volumes against the default layout (contiguous
experts, samples in order) and the capacity-free bound. Train with router.grouter.plan=<out>.
"""

from __future__ import annotations

import logging
import sys
import time

import hydra
from omegaconf import DictConfig

from megatron_grouter.app import CONF_DIR, run_app

log = logging.getLogger("megatron_grouter")


def _open_routing_cache(cfg: DictConfig):
    from megatron_grouter.data.routing_cache import open_cache
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, load_grouter
    from megatron_grouter.routing.setup import default_cache_dir

    fingerprint = grouter_fingerprint(cfg.grouter)
    cache_dir = cfg.cache or str(default_cache_dir(cfg.data.prefix, fingerprint))
    # with the Grouter, the cache's rows are spot-checked against it (a relabelled manifest)
    return open_cache(cache_dir, cfg.data.prefix, grouter_fingerprint=fingerprint,
                      grouter=load_grouter(cfg.grouter)[0])


def _training_dataset(cfg: DictConfig):
    from pathlib import Path

    from megatron_grouter.data.gpt_datasets import build_gpt_datasets
    from megatron_grouter.data.tokenizer import load_tokenizer

    train = cfg.train
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    num_samples = (train.steps * train.global_batch_size, max(1, train.eval_iters) * train.global_batch_size, 0)
    train_ds, _, _ = build_gpt_datasets(cfg.data.prefix, tokenizer, seq_length=train.seq_length, seed=train.seed,
                                        split=cfg.data.split, num_samples=num_samples,
                                        cache_dir=str(Path(cfg.data.out_dir) / "index_cache"))
    return train_ds


def _topology(cfg: DictConfig):
    from megatron_grouter.placement.alltoall_time import Topology

    settings = dict(cfg.topology)
    settings["gpus_per_node"] = settings.get("gpus_per_node") or cfg.ranks_per_node
    return Topology(**settings)


def _write_book(cfg: DictConfig, plan, topk_SLK, plan_path):
    """Every micro-batch's dispatch plan for the run's layout, beside the plan."""
    from megatron_grouter.dispatch.plan_book import DispatchPlanBook, book_path

    dp_size = cfg.dp_size or cfg.ep_size
    micro_batch_size = cfg.train.get("micro_batch_size") or plan.global_batch // dp_size
    started = time.perf_counter()
    book = DispatchPlanBook.build(plan, topk_SLK, micro_batch_size, dp_size)
    path = book.save(book_path(plan_path))
    log.info("plan-ep: dispatch plans of %d steps x %d micro-batches (DP %d, micro-batch %d) in %.1fs: %s",
             book.counts_QXMRE.shape[0], book.micro_batches, dp_size, micro_batch_size,
             time.perf_counter() - started, path)
    return path


def plan_ep(cfg: DictConfig) -> dict:
    from megatron_grouter.placement.planner import PlannerSettings, make_plan
    from megatron_grouter.placement.training_samples import (cache_fingerprint, sample_order_fingerprint,
                                                             training_topk)
    from megatron_grouter.training.loggers import setup_console_logging

    setup_console_logging(True)
    cache = _open_routing_cache(cfg)
    num_experts, global_batch = int(cache.manifest["num_experts"]), int(cfg.train.global_batch_size)
    settings = PlannerSettings(ep_size=cfg.ep_size, global_batch=global_batch, ranks_per_node=cfg.ranks_per_node,
                               granularity=cfg.granularity, method=cfg.method, placement=cfg.placement,
                               perturbations=cfg.perturbations, search_samples=cfg.search_samples,
                               report_samples=cfg.report_samples, seed=cfg.seed)
    settings.check(num_experts)
    train_ds = _training_dataset(cfg)
    num_batches = len(train_ds) // global_batch  # ≥ train.steps: GPTDataset adds epochs as needed
    if len(train_ds) % global_batch:
        log.info("plan-ep: the last %d samples (a partial global batch) are dropped: the plan's schedule repeats its "
                 "%d whole batches", len(train_ds) % global_batch, num_batches)
    topology = _topology(cfg)
    topology.check(cfg.ep_size)
    log.info("plan-ep: %d batches of %d samples x %d tokens, E=%d top-%d, EP %d (%s), cache %s", num_batches,
             global_batch, cfg.train.seq_length, num_experts, cache.topk, cfg.ep_size, cfg.granularity, cache.directory)
    started = time.perf_counter()
    topk_SLK = training_topk(train_ds, cache, num_batches * global_batch, progress=cfg.progress)
    read_seconds = time.perf_counter() - started
    log.info("plan-ep: read the routing of %d samples in %.1fs; planning (%s)", topk_SLK.shape[0], read_seconds,
             cfg.method)
    plan, report = make_plan(topk_SLK, num_experts, settings, cache_fingerprint(cache.manifest))
    plan.training = {"sample_order": sample_order_fingerprint(train_ds), "seq_length": cfg.train.seq_length,
                     "seed": cfg.train.seed, "steps": cfg.train.steps, "split": cfg.data.split,
                     "prefix": cfg.data.prefix}
    path = plan.save(cfg.out)
    book = _write_book(cfg, plan, topk_SLK, path) if cfg.dispatch_book else None
    default, planned = report.default.summary(), report.planned.summary()
    for name in ("dedup_sends_rank", "pairs_leaving_rank", "dedup_sends_node", "pairs_leaving_node"):
        log.info("plan-ep: %-19s default %12d  planned %12d", name, default[name], planned[name])
    for line in report.lines() + report.alltoall_lines(topology):
        log.info("plan-ep: %s", line)
    log.info("plan-ep: saved %s", path)
    ratios = report.planned.ratios_to(report.default)
    return {"plan": str(path), "book": book and str(book), "batches": num_batches, "default": default,
            "planned": planned, "alltoall": report.alltoall_lines(topology),
            "ratios": ratios, "bound_ratio": report.capacity_free_sends / max(default["dedup_sends_rank"], 1),
            "seconds": {"read": read_seconds, **report.seconds}}


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="plan_ep", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_app(plan_ep, cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
