"""Preemptive routing end to end: predispatch → routing cache → frozen-Grouter routers in mg-train."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.routing.grouter_fixtures import NUM_EXPERTS, TOPK, predispatched_corpus, random_grouter
from megatron_grouter.data.routing_cache import open_cache
from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import grouter_fingerprint
from tests.train_runs import REPO, read_metrics, train_in_process, train_losses, torchrun, val_losses

ROUTED_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                "model.ffn_hidden_size=128", f"model.num_experts={NUM_EXPERTS}",
                "model.moe_ffn_hidden_size=64", f"model.topk={TOPK}", "train.seq_length=64",
                "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_interval=10"]


@pytest.fixture(scope="module")
def setup(stdlib_data, tmp_path_factory):
    return predispatched_corpus(stdlib_data, tmp_path_factory.mktemp("preemptive"))


def compose_predispatch(grouter, data, cache, extra=()):
    from tests.offline.distill_runs import compose_tool

    return compose_tool("predispatch", [f"grouter={grouter}", f"data.prefix={data['prefix']}",
                                        f"data.tokenizer={data['tokenizer']}", f"cache={cache}",
                                        "chunk_windows=16", *extra])


def routed(setup, router, out_dir, source="cached", steps=6, extra=()):
    data = setup["data"]
    return [f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
            f"data.out_dir={data['out_dir']}", *ROUTED_MODEL, f"router={router}",
            f"router.grouter.path={setup['grouter']}", f"router.grouter.source={source}",
            f"router.grouter.cache={setup['cache']}", f"train.steps={steps}", "train.warmup_steps=2",
            "train.eval_interval=0", "train.save_interval=-1", f"train.out_dir={out_dir}", *extra]


def test_cache_size_and_manifest(setup):
    stats = setup["stats"]
    num_tokens = stats["tokens"]
    assert stats["bytes_per_token"] == TOPK * (1 + 2)  # uint8 ids + bf16 weights
    assert (setup["cache"] / "indices.bin").stat().st_size == num_tokens * TOPK
    assert (setup["cache"] / "weights.bin").stat().st_size == num_tokens * TOPK * 2
    manifest = json.loads((setup["cache"] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["grouter_fingerprint"] == grouter_fingerprint(setup["grouter"])
    cache = open_cache(setup["cache"], setup["data"]["prefix"])
    indices, weights = cache.rows(np.arange(100))
    assert indices.max() < NUM_EXPERTS and torch.allclose(weights.sum(-1), torch.ones(100), atol=1e-2)


def test_online_and_cached_routing_give_identical_training(setup, tmp_path):
    train_in_process(routed(setup, "grouter_fixed", tmp_path / "online", source="online"))
    train_in_process(routed(setup, "grouter_fixed", tmp_path / "cached", source="cached"))
    online, cached = train_losses(tmp_path / "online"), train_losses(tmp_path / "cached")
    assert len(online) == 6 and online == cached  # exact


def test_fixed_router_has_no_parameters_and_no_aux_loss(setup, tmp_path):
    from megatron_grouter.routing.preemptive_router import FixedRouter
    from megatron_grouter.training.config import to_train_config
    from megatron_grouter.training.model import build_gpt_model, moe_layers
    from tests.train_runs import compose

    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed

    root = to_train_config(compose(routed(setup, "grouter_fixed", tmp_path)))
    init_distributed()
    try:
        model = build_gpt_model(root.model, root.router, root.parallel, vocab_size=4096)
    finally:
        shutdown_distributed()
    routers = [layer.router for layer in moe_layers(model)]
    assert routers and all(isinstance(router, FixedRouter) for router in routers)
    assert sum(p.numel() for router in routers for p in router.parameters()) == 0
    train_in_process(routed(setup, "grouter_fixed", tmp_path / "run", steps=4))
    record = [r for r in read_metrics(tmp_path / "run") if "loss" in r][0]
    assert not any("load_balancing" in key or "z_loss" in key for key in record)
    assert record["moe/active_experts"] == TOPK


def test_hybrid_gate_learns_and_loss_falls(setup, tmp_path):
    train_in_process(routed(setup, "grouter_hybrid", tmp_path, steps=80,
                            extra=["train.eval_interval=40", "train.eval_iters=1"]))
    val = val_losses(tmp_path)
    assert val[80] < val[0] - 0.5
    steps = [record for record in read_metrics(tmp_path) if "loss" in record]
    assert np.mean([record["loss"] for record in steps[-10:]]) < steps[0]["loss"] - 1.5
    assert steps[0]["moe/gate_entropy"] != pytest.approx(steps[-1]["moe/gate_entropy"], abs=1e-4)


def test_evaluation_leaves_the_hybrid_gate_metrics_alone(setup, tmp_path):
    """Evaluating after every step must not change a single training metric (its tokens used to
    leak into the next step's moe/gate_entropy)."""
    for name, extra in (("plain", ["train.eval_interval=0"]), ("evaluated", ["train.eval_interval=1"])):
        overrides = [item for item in routed(setup, "grouter_hybrid", tmp_path / name, steps=3)
                     if not item.startswith("train.eval_interval=")]
        train_in_process([*overrides, *extra, "train.eval_iters=2"])
    plain, evaluated = ([record for record in read_metrics(tmp_path / name) if "loss" in record]
                        for name in ("plain", "evaluated"))
    assert len(plain) == len(evaluated) == 3 and len(val_losses(tmp_path / "evaluated")) == 4
    for ours, theirs in zip(plain, evaluated):
        assert ours["loss"] == theirs["loss"]
        assert ours["moe/gate_entropy"] == theirs["moe/gate_entropy"]


def test_expert_parallel_training_from_cache(setup, tmp_path):
    torchrun(2, routed(setup, "grouter_fixed", tmp_path, steps=4, extra=["parallel=ep2"]))
    records = [record for record in read_metrics(tmp_path) if "loss" in record]
    assert len(records) == 4 and all("moe/max_vio" in record for record in records)


def test_every_cache_mismatch_is_refused(setup, stdlib_data, tmp_path):
    prefix = setup["data"]["prefix"]
    with pytest.raises(UserError, match="another dataset"):
        open_cache(setup["cache"], stdlib_data["prefix"])
    with pytest.raises(UserError, match="another Grouter"):
        open_cache(setup["cache"], prefix, grouter_fingerprint="0" * 64)
    with pytest.raises(UserError, match="routes to 8 experts but the model has 16"):
        open_cache(setup["cache"], prefix, num_experts=16)
    with pytest.raises(UserError, match="top-3"):
        open_cache(setup["cache"], prefix, topk=3)
    with pytest.raises(UserError, match="no routing cache"):
        open_cache(tmp_path / "nothing", prefix)
    broken = tmp_path / "broken"
    shutil.copytree(setup["cache"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        open_cache(broken, prefix)
    # Training with a Grouter that does not fit the model is refused before it starts.
    other = random_grouter(setup["data"]["tokenizer"], tmp_path / "g16", num_experts=16)
    with pytest.raises(UserError, match="16 experts"):
        train_in_process(routed(setup, "grouter_fixed", tmp_path / "run",
                                extra=[f"router.grouter.path={other}"]))


def test_cache_survives_a_kill_mid_write(setup, tmp_path):
    data = setup["data"]
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "megatron_grouter.offline.predispatch", f"grouter={setup['grouter']}",
               f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}", f"cache={cache}",
               "chunk_windows=2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    from megatron_grouter.offline.predispatch import staging_directory

    progress = staging_directory(cache) / "progress"  # the cache is published only once complete
    while time.time() < deadline and len(list(progress.glob("*.done"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(progress.glob("*.done")))
    assert done_before >= 3
    with pytest.raises(UserError, match="no routing cache"):
        open_cache(cache, data["prefix"])
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    resumed = open_cache(cache, data["prefix"])
    reference = open_cache(setup["cache"], data["prefix"])
    assert np.array_equal(np.asarray(resumed.indices), np.asarray(reference.indices))
    assert np.array_equal(np.asarray(resumed.weights_bits), np.asarray(reference.weights_bits))
