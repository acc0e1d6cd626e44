"""mg-predispatch: write the routing cache of a dataset (see data/routing_cache.py).

The cache holds exactly the online Grouter's routing (same document windows), so it is causal
when the Grouter is. Under torchrun the chunks are split over the ranks, each writing its rows
straight into the shared memory-mapped files.

The dataset is verified first (tokenizer, and the .bin's content against its recorded sha256:
once, cached; data/integrity.py). The cache is written into a hidden staging directory beside
the target and renamed into place only when complete: a failure removes it, a killed run leaves
it for the next run with the same arguments to resume (finished chunks are skipped); the target
directory never holds a partial cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_grouter.app import CONF_DIR, run_app
from megatron_grouter.atomic_files import publish_directory

log = logging.getLogger("megatron_grouter")


def predispatch(cfg: DictConfig) -> dict:
    from megatron_grouter.data.routing_cache import write_cache
    from megatron_grouter.data.integrity import verify_dataset
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, load_grouter
    from megatron_grouter.routing.setup import default_cache_dir
    from megatron_grouter.training.loggers import setup_console_logging

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    setup_console_logging(rank == 0)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        from megatron_grouter.runtime.distributed import start_process_group

        start_process_group()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    verify_dataset(cfg.data.prefix, tokenizer)  # tokenizer, and the .bin's content hash (cached)
    grouter, _ = load_grouter(cfg.grouter, expected_tokenizer=tokenizer.fingerprint())
    grouter.eval().requires_grad_(False).to(device)
    fingerprint = grouter_fingerprint(cfg.grouter)
    cache_dir = cfg.cache or str(default_cache_dir(cfg.data.prefix, fingerprint))
    log.info("predispatch: %s -> %s (E=%d, top-%d, window %d, %d process(es))", cfg.data.prefix,
             cache_dir, grouter.config.num_experts, grouter.config.topk,
             grouter.config.max_seq_length, world_size)
    if grouter.config.sees_future_tokens:
        # The cache itself is fine; mg-train refuses it for a causal LM unless the user opts in.
        log.warning("predispatch: the Grouter is bidirectional (causal=false): its routing SEES FUTURE "
                    "TOKENS; mg-train uses this cache only with router.grouter.allow_future_context=true")
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    existing = _complete_cache(cache_dir, cfg.data.prefix, grouter, fingerprint, device)
    if existing is not None:
        log.info("predispatch: %s already holds this Grouter's complete routing of %s", cache_dir,
                 cfg.data.prefix)
        if dist.is_initialized():
            dist.destroy_process_group()
        return {"cache": cache_dir, "tokens": existing.manifest["dataset"]["num_tokens"],
                "routed_tokens_this_rank": 0,
                "bytes_per_token": existing.topk * (existing.indices.dtype.itemsize + 2)}
    staging = staging_directory(cache_dir)
    if rank == 0:
        os.makedirs(staging, exist_ok=True)
    barrier()
    try:
        stats = write_cache(staging, cfg.data.prefix, grouter, fingerprint,
                            window=grouter.config.max_seq_length, rank=rank, world_size=world_size,
                            chunk_windows=cfg.chunk_windows, device=device, barrier=barrier)
        if rank == 0:
            shutil.rmtree(staging / "progress", ignore_errors=True)
            publish_directory(staging, cache_dir)  # (replaces an older cache only now)
    except Exception:  # (an interrupt, like a kill, leaves the staging directory to resume from)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()
    log.info("predispatch done: %s", json.dumps(stats))
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"cache": cache_dir, **stats}


def _complete_cache(cache_dir, prefix, grouter, fingerprint, device):
    """The cache already at `cache_dir` when it is complete and this Grouter's, else None."""
    from megatron_grouter.data.routing_cache import open_cache
    from megatron_grouter.errors import UserError

    if not (Path(cache_dir) / "manifest.json").is_file():
        return None
    try:
        cache = open_cache(cache_dir, prefix, grouter_fingerprint=fingerprint, grouter=grouter, device=device)
    except UserError:
        return None  # rewritten below
    return cache if cache.manifest["window"] == grouter.config.max_seq_length else None


def staging_directory(cache_dir: str | os.PathLike) -> Path:
    """Where a cache is written before it is complete: hidden, beside the target, and the same
    for the same target (a killed run's chunks are found by the next one)."""
    target = Path(cache_dir)
    return target.parent / f".{target.name}.partial"


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="predispatch", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_app(predispatch, cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
