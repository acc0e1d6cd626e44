"""Routing caches verified by content: a relabelled cache, and mg-predispatch on a damaged .bin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_grouter.data.routing_cache import open_cache
from megatron_grouter.errors import UserError
from megatron_grouter.grouter.checkpoint import grouter_fingerprint, load_grouter
from tests.routing.grouter_fixtures import NUM_EXPERTS, TOPK, predispatched_corpus, random_grouter
from tests.train_runs import REPO, repo_env, train_in_process

ROUTED_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                "model.ffn_hidden_size=128", f"model.num_experts={NUM_EXPERTS}", "model.moe_ffn_hidden_size=64",
                f"model.topk={TOPK}", "train.seq_length=64", "train.micro_batch_size=4",
                "train.global_batch_size=8", "train.log_interval=20"]


@pytest.fixture(scope="module")
def setup(stdlib_data, tmp_path_factory):
    return predispatched_corpus(stdlib_data, tmp_path_factory.mktemp("cache_content"), documents=20)


def test_cache_relabelled_to_another_grouter_is_refused(setup, tmp_path):
    other = random_grouter(setup["data"]["tokenizer"], tmp_path / "other", seed=1)
    manifest_path = setup["cache"] / "manifest.json"
    original = manifest_path.read_text()
    prefix = setup["data"]["prefix"]
    # The Grouter that wrote it passes the spot check.
    grouter, _ = load_grouter(setup["grouter"])
    open_cache(setup["cache"], prefix, grouter_fingerprint=grouter_fingerprint(setup["grouter"]),
               grouter=grouter)
    try:
        manifest_path.write_text(json.dumps({**json.loads(original),
                                             "grouter_fingerprint": grouter_fingerprint(other)}))
        other_grouter, _ = load_grouter(other)
        with pytest.raises(UserError, match="does not hold this Grouter's routing") as refused:
            open_cache(setup["cache"], prefix, grouter_fingerprint=grouter_fingerprint(other),
                       grouter=other_grouter)
        assert "\n" not in str(refused.value)
        # Training with the other Grouter on the relabelled cache is refused before any step.
        data = setup["data"]
        with pytest.raises(UserError, match="does not hold this Grouter's routing"):
            train_in_process([f"data.prefix={prefix}", f"data.tokenizer={data['tokenizer']}",
                              f"data.out_dir={data['out_dir']}", *ROUTED_MODEL, "router=grouter_fixed",
                              f"router.grouter.path={other}", "router.grouter.source=cached",
                              f"router.grouter.cache={setup['cache']}", "train.steps=1",
                              "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=-1",
                              "data.split='80,10,10'",
                              f"train.out_dir={tmp_path / 'run'}"])
    finally:
        manifest_path.write_text(original)


def _predispatch(setup, cache, prefix):
    data = setup["data"]
    return subprocess.run(
        [sys.executable, "-m", "megatron_grouter.offline.predispatch", f"grouter={setup['grouter']}",
         f"data.prefix={prefix}", f"data.tokenizer={data['tokenizer']}", f"cache={cache}", "chunk_windows=4"],
        cwd=REPO, env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def test_predispatch_checks_the_bin_hash_and_leaves_no_partial_cache(setup, tmp_path):
    import shutil

    prefix = str(tmp_path / "damaged")
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(setup["data"]["prefix"] + suffix, prefix + suffix)
    with open(prefix + ".bin", "r+b") as handle:  # one token id changed, still inside the vocabulary
        handle.seek(100)
        value = handle.read(1)[0]
        handle.seek(100)
        handle.write(bytes([value ^ 0x01]))
    cache = tmp_path / "cache"
    result = _predispatch(setup, cache, prefix)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "content hash" in errors[0] and "tokenizer" not in errors[0].split(";")[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["damaged.bin", "damaged.idx", "damaged.meta.json"]
    # The intact dataset: checked once (remembered beside it), the cache published complete.
    shutil.copy(setup["data"]["prefix"] + ".bin", prefix + ".bin")
    result = _predispatch(setup, cache, prefix)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    assert not (cache / "progress").exists() and not (tmp_path / ".cache.partial").exists()
    assert (tmp_path / "damaged.verified.json").is_file()
    open_cache(cache, prefix, grouter=load_grouter(setup["grouter"])[0])
