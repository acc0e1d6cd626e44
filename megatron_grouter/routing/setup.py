"""Turns the router config into the routing source, rule and provider a preemptive router needs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.routing.registry import router_kind
from megatron_grouter.routing.microbatch import RoutingRule
from megatron_grouter.routing.provider import PreemptiveRouting
from megatron_grouter.routing.sources import CachedRoutingSource, HashTableSource, OnlineGrouterSource

log = logging.getLogger("megatron_grouter")


def default_cache_dir(prefix: str, grouter_fingerprint: str) -> Path:
    """Caches live beside their dataset, one directory per Grouter."""
    return Path(prefix + ".routing") / grouter_fingerprint[:16]


SEES_FUTURE_TOKENS = "sees future tokens"


def check_causal_routing(grouter_config, settings, path) -> bool:
    """Refuse a Grouter whose routing reads later tokens, unless the user opted in.

    mg-train trains causal LMs: the MoE output that predicts token t+1 must not depend on tokens
    after t, and expert choices and gate weights are part of that output. Returns whether the run
    sees future tokens (only with router.grouter.allow_future_context=true).
    """
    if not grouter_config.sees_future_tokens:
        return False
    if not settings.allow_future_context:
        raise UserError(f"Grouter at {path} is bidirectional (causal=false): the routing of token t "
                        "would depend on tokens after t, which a causal LM must not see; distill a "
                        "causal Grouter (mg-distill grouter.causal=true) or set "
                        "router.grouter.allow_future_context=true to train a model that sees future tokens")
    log.warning("router.grouter.allow_future_context=true: the bidirectional Grouter at %s routes each "
                "token from its whole window; this run %s (its losses are not comparable with "
                "causal routers' and the model cannot generate)", path, SEES_FUTURE_TOKENS.upper())
    return True


def load_configured_grouter(root, tokenizer, device: torch.device):
    """The frozen Grouter of router.grouter.path and its fingerprint; refuses a bidirectional one
    for a causal LM unless router.grouter.allow_future_context (online and cached routing alike)."""
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, load_grouter

    settings = root.router.grouter
    if not settings.path:
        raise UserError(f"router={root.router.name} needs router.grouter.path (a Grouter checkpoint "
                        "directory, e.g. from mg-distill)")
    grouter, _ = load_grouter(settings.path, expected_num_experts=root.model.num_experts,
                              expected_tokenizer=tokenizer.fingerprint())
    if grouter.config.topk != root.model.topk:
        raise UserError(f"Grouter at {settings.path} routes top-{grouter.config.topk} but model.topk="
                        f"{root.model.topk}; set model.topk={grouter.config.topk}")
    check_causal_routing(grouter.config, settings, settings.path)
    grouter.eval().requires_grad_(False).to(device)
    return grouter, grouter_fingerprint(settings.path)


def build_hash_source(root, prefix: str, tokenizer, vocab_size: int) -> HashTableSource:
    from megatron_grouter.routing.hash_table import (balanced_hash_table, load_table,
                                                     token_frequencies)

    if root.router.hash.table:
        table_VK = load_table(root.router.hash.table, root.model.num_experts, root.model.topk, vocab_size)
    else:
        counts_V = token_frequencies(prefix, vocab_size, root.data.split)
        table_VK = balanced_hash_table(counts_V, root.model.num_experts, root.model.topk,
                                       seed=root.train.seed)
    return HashTableSource(torch.from_numpy(np.asarray(table_VK)))


def routing_rule(root, slot_of_expert: torch.Tensor | None = None) -> RoutingRule | None:
    """The run's rule from source top-k to layer routing (None for learned routers): the
    placement's slots; for the fixed router also the source weights' scaling and the dynamic
    activation threshold."""
    if not router_kind(root.router.type).preemptive:
        return None
    slots = None if slot_of_expert is None else slot_of_expert.long().cpu()
    if root.router.type != "grouter_fixed":
        return RoutingRule(root.model.num_experts, slots)
    settings = root.router.grouter
    return RoutingRule(root.model.num_experts, slots, settings.scaling_factor, settings.activation_threshold)


def build_routing_source(root, prefix: str, tokenizer, vocab_size: int, device: torch.device):
    """(source, sees_future_tokens) of a preemptive router."""
    if root.router.type == "hash":
        return build_hash_source(root, prefix, tokenizer, vocab_size), False
    grouter, fingerprint = load_configured_grouter(root, tokenizer, device)
    settings = root.router.grouter
    if settings.source == "online":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from megatron_grouter.routing.windows import DocumentWindows, OnlineGrouterRouting

        windows = DocumentWindows(IndexedDataset(prefix, mmap=True), grouter.config.max_seq_length)
        source = OnlineGrouterSource(OnlineGrouterRouting(grouter, windows, device))
    elif settings.source == "cached":
        from megatron_grouter.data.routing_cache import open_cache

        cache_dir = settings.cache or default_cache_dir(prefix, fingerprint)
        cache = open_cache(cache_dir, prefix, grouter_fingerprint=fingerprint,
                           num_experts=root.model.num_experts, topk=root.model.topk, grouter=grouter,
                           device=device)
        if cache.manifest["window"] != grouter.config.max_seq_length:
            raise UserError(f"routing cache {cache_dir} used window {cache.manifest['window']} but "
                            f"the Grouter's is {grouter.config.max_seq_length}; predispatch again")
        source = CachedRoutingSource(cache)
    else:
        raise UserError(f"router.grouter.source={settings.source!r}: choose online or cached")
    sees_future = grouter.config.sees_future_tokens
    log.info("router %s: Grouter %s (%s routing, %s)", root.router.name, settings.path, settings.source,
             SEES_FUTURE_TOKENS.upper() if sees_future else "causal")
    return source, sees_future


def build_preemptive_routing(root, prefix: str, tokenizer, vocab_size: int, device: torch.device,
                             rule: RoutingRule | None, planner=None,
                             observers: list | None = None) -> PreemptiveRouting | None:
    """What routes each micro-batch by `rule` before the schedule runs, or None for learned
    routers (no rule)."""
    if rule is None:
        return None
    source, sees_future = build_routing_source(root, prefix, tokenizer, vocab_size, device)
    return PreemptiveRouting(source, rule, device, planner=planner, sees_future_tokens=sees_future,
                             observers=observers)
