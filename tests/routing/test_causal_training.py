"""Causal preemptive routing end to end: the routing sources, mg-train's refusal, generation.

- Online and cached routing of a causal Grouter: perturbing every corpus token after position p
  leaves the routing (ids and weights) of every token <= p bit-identical, and both paths agree;
  a bidirectional Grouter fails the check.
- mg-train refuses a bidirectional Grouter in one line (exit 2) unless
  router.grouter.allow_future_context=true, and then labels the run "sees future tokens".
- Generation consistency: a target trained a few steps with a causal Grouter gives the same
  logits at position t from the full sequence and from the prefix ending at t; with a
  bidirectional Grouter it does not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.routing.grouter_fixtures import NUM_EXPERTS, TOPK, WINDOW, random_grouter, small_corpus
from megatron_grouter.errors import UserError
from tests.train_runs import REPO, read_metrics, train_in_process

ROUTED_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                "model.ffn_hidden_size=128", f"model.num_experts={NUM_EXPERTS}",
                "model.moe_ffn_hidden_size=64", f"model.topk={TOPK}", f"train.seq_length={WINDOW}",
                "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_interval=1"]
CUTS = (4, 20, 41)


@pytest.fixture(scope="module")
def setup(stdlib_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    data = small_corpus(stdlib_data, root / "corpus", documents=40)
    grouters = {causal: random_grouter(data["tokenizer"], root / f"grouter-{causal}", causal=causal)
                for causal in (True, False)}
    return {"data": data, "grouters": grouters, "root": root}


def perturbed_copy(prefix: str, out: Path, after: int) -> str:
    """The indexed dataset with every token after global position `after` replaced at random."""
    out.mkdir(parents=True, exist_ok=True)
    copy = str(out / Path(prefix).name)
    shutil.copy(prefix + ".idx", copy + ".idx")
    shutil.copy(prefix + ".bin", copy + ".bin")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dtype = IndexedDataset(prefix, mmap=True).index.dtype
    tokens = np.memmap(copy + ".bin", dtype=dtype, mode="r+")
    generator = np.random.default_rng(0)
    tokens[after + 1:] = generator.integers(0, 4000, size=len(tokens) - after - 1).astype(dtype)
    tokens.flush()
    return copy


def routing_of(grouter_dir: Path, prefix: str, positions: np.ndarray, cache_dir: Path):
    """(online, cached) routing of `positions`: each an (ids, weights) pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_grouter.data.routing_cache import open_cache, write_cache
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, load_grouter
    from megatron_grouter.routing.windows import DocumentWindows, OnlineGrouterRouting

    grouter, _ = load_grouter(grouter_dir)
    grouter.eval()
    windows = DocumentWindows(IndexedDataset(prefix, mmap=True), WINDOW)
    online = OnlineGrouterRouting(grouter, windows, torch.device("cpu")).route_positions(positions[None])
    write_cache(cache_dir, prefix, grouter, grouter_fingerprint(grouter_dir), WINDOW, chunk_windows=64,
                progress=False)
    cached = open_cache(cache_dir, prefix).rows(positions[None])
    return online, cached


@pytest.mark.parametrize("causal", [True, False])
def test_online_and_cached_routing_ignore_later_tokens(setup, causal, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = setup["data"]["prefix"]
    index = IndexedDataset(prefix, mmap=True).index
    starts = np.asarray(index.sequence_pointers) // index.dtype_size
    lengths = np.asarray(index.sequence_lengths)
    document = int(np.flatnonzero(lengths > 3 * WINDOW)[1])
    # p: inside the document's second window; a sample may start before that window (past context).
    cut = int(starts[document]) + WINDOW + 17
    positions = np.arange(cut - WINDOW - 10, cut + 1)
    original = routing_of(setup["grouters"][causal], prefix, positions, tmp_path / "cache")
    changed = routing_of(setup["grouters"][causal], perturbed_copy(prefix, tmp_path / "perturbed", cut),
                         positions, tmp_path / "cache-perturbed")
    for path in range(2):  # online, cached
        same = all(torch.equal(before, after) for before, after in zip(original[path], changed[path]))
        assert same == causal, ("online", "cached")[path]
    for ours, theirs in zip(original[0], original[1]):  # the two paths agree
        assert torch.equal(ours, theirs)


def test_hash_routing_ignores_later_tokens():
    from types import SimpleNamespace

    from megatron_grouter.routing.sources import HashTableSource

    generator = torch.Generator().manual_seed(0)
    source = HashTableSource(torch.randint(0, NUM_EXPERTS, (500, TOPK), generator=generator))
    tokens_BS = torch.randint(0, 500, (2, WINDOW), generator=generator)
    changed_BS = tokens_BS.clone()
    changed_BS[:, 30:] = torch.randint(0, 500, (2, WINDOW - 30), generator=generator)
    (before_BSK, before_weights), (after_BSK, after_weights) = (
        source.topk_for(SimpleNamespace(tokens_BS=tokens_BS)), source.topk_for(SimpleNamespace(tokens_BS=changed_BS)))
    assert torch.equal(before_BSK[:, :30], after_BSK[:, :30])
    assert torch.equal(before_weights[:, :30], after_weights[:, :30])
    assert not torch.equal(before_BSK, after_BSK)


def routed(setup, causal: bool, out_dir: Path, source: str = "online", steps: int = 4, extra=()):
    data = setup["data"]
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
            f"data.out_dir={data['out_dir']}", *ROUTED_MODEL, "router=grouter_fixed",
            f"router.grouter.path={setup['grouters'][causal]}", f"router.grouter.source={source}",
            f"router.grouter.cache={setup['root'] / 'no-cache'}", f"train.steps={steps}",
            "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=0",
            f"train.out_dir={out_dir}", *extra]


def test_mg_train_refuses_a_bidirectional_grouter_in_one_line(setup, tmp_path):
    command = [sys.executable, "-m", "megatron_grouter.train", *routed(setup, False, tmp_path / "run")]
    # a fresh job: not the rendezvous address an in-process run of this session left in os.environ
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bidirectional" in errors[0] and "allow_future_context=true" in errors[0]
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not read_metrics(tmp_path / "run")  # refused before any step
    # The cached path is refused the same way, before the cache is even opened.
    with pytest.raises(UserError, match="allow_future_context"):
        train_in_process(routed(setup, False, tmp_path / "cached", source="cached"))


@pytest.fixture(scope="module")
def trained(setup):
    """A target trained 4 steps with the causal Grouter, and one with the bidirectional (opted in)."""
    runs = {}
    for causal in (True, False):
        out = setup["root"] / f"target-{causal}"
        extra = [] if causal else ["router.grouter.allow_future_context=true"]
        train_in_process(routed(setup, causal, out, extra=extra))
        runs[causal] = out
    return runs


def test_opted_in_run_says_it_sees_future_tokens(setup, trained, tmp_path, capsys):
    for causal, out in trained.items():
        steps = [record for record in read_metrics(out) if "loss" in record]
        assert len(steps) == 4
        assert all(record.get("routing/sees_future_tokens") == (None if causal else 1) for record in steps)
    capsys.readouterr()
    train_in_process(routed(setup, False, tmp_path / "again", steps=1,
                            extra=["router.grouter.allow_future_context=true"]))
    start = [line for line in capsys.readouterr().err.splitlines() if "Grouter" in line]
    assert start and all("SEES FUTURE TOKENS" in line for line in start), start


def load_target(run_dir: Path):
    """The run's GPTModel (its own config) with its last checkpoint's weights and a RoutingContext."""
    from megatron.core import dist_checkpointing

    from megatron_grouter.routing.context import RoutingContext
    from megatron_grouter.training.config import ParallelConfig, to_train_config
    from megatron_grouter.training.model import build_gpt_model

    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    state = json.loads((checkpoint / "train_state.json").read_text())
    root = to_train_config(state["config"])
    context = RoutingContext()
    model = build_gpt_model(root.model, root.router, ParallelConfig(), state["vocab_size"], context=context)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(checkpoint))["model"]
    model.load_state_dict(loaded, strict=True)
    return model.eval(), context, root


@torch.no_grad()
def next_token_logits(model, context, root, grouter, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a forward over `tokens_BS`, routed by the Grouter over exactly these tokens
    (at generation time the Grouter sees only the prefix that exists)."""
    from megatron_grouter.routing.microbatch import route_micro_batch
    from megatron_grouter.routing.setup import routing_rule

    batch, seq = tokens_BS.shape
    with context.serving(route_micro_batch(*grouter.route(tokens_BS), routing_rule(root))):
        mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]
        return model(tokens_BS, torch.arange(seq).expand(batch, seq), mask).float()


@pytest.mark.parametrize("causal", [True, False])
def test_logits_of_a_prefix_equal_those_of_the_full_sequence_only_when_causal(setup, trained, causal):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_grouter.grouter.checkpoint import load_grouter
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    dataset = IndexedDataset(setup["data"]["prefix"], mmap=True)
    documents = [number for number in range(len(dataset)) if len(dataset[number]) >= WINDOW][:2]
    tokens_BS = torch.from_numpy(np.stack([dataset[number][:WINDOW] for number in documents]).astype(np.int64))
    grouter, _ = load_grouter(setup["grouters"][causal])
    grouter.eval()
    init_distributed()
    try:
        model, context, root = load_target(trained[causal])
        full_BSV = next_token_logits(model, context, root, grouter, tokens_BS)
        gaps = []
        for cut in CUTS:
            prefix_BSV = next_token_logits(model, context, root, grouter, tokens_BS[:, :cut + 1])
            gaps.append(float((prefix_BSV[:, cut] - full_BSV[:, cut]).abs().max()))
    finally:
        shutdown_distributed()
    print(f"causal={causal}: max |logit(prefix) - logit(full)| at t={CUTS}: {gaps}")
    # Measured: causal ~1e-7 (fp32 round-off), bidirectional 1e-3..7e-2.
    if causal:
        assert max(gaps) < 1e-5
    else:
        assert min(gaps) > 1e-4
