"""Refused runs end in one line and leave nothing behind: a second job into a locked out_dir,
a Grouter of another expert count, invalid numbers."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_grouter.errors import UserError
from megatron_grouter.training.config import to_train_config, validate
from megatron_grouter.training.run_lock import LOCK_NAME, RunLock
from tests.tiny_dataset import TINY_MODEL, tiny_dataset
from tests.train_runs import REPO, compose, data_overrides, train_in_process

HOLDER = textwrap.dedent("""
    import multiprocessing, sys, time
    from megatron_grouter.training.run_lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    # A forked child (as megatron's checkpoint writers are) that outlives this process.
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
    child.start()
    print("locked", child.pid, flush=True)
    time.sleep(120)
""")


@pytest.fixture()
def holder(tmp_path):
    """Another process holding the lock on tmp_path/run."""
    out_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(out_dir)], stdout=subprocess.PIPE,
                               text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    word, child = process.stdout.readline().split()
    assert word == "locked"
    yield out_dir, process
    process.kill()
    process.wait()
    try:
        os.kill(int(child), signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_second_run_into_a_locked_out_dir_is_refused_naming_the_holder(holder):
    out_dir, process = holder
    with pytest.raises(UserError) as refused:
        train_in_process([*TINY_MODEL, "train.steps=1", f"train.out_dir={out_dir}",
                          f"data.prefix={out_dir}/missing", f"data.tokenizer={out_dir}/missing"])
    message = str(refused.value)
    assert f"in use by another run (pid {process.pid} on " in message and "\n" not in message
    assert sorted(path.name for path in out_dir.iterdir()) == [LOCK_NAME]  # nothing of ours written


def test_lock_of_a_killed_run_is_free_and_release_tidies_up(holder):
    out_dir, process = holder
    process.kill()
    process.wait()
    lock = RunLock(out_dir).acquire()  # the kernel dropped the dead holder's lock; its child has none
    with pytest.raises(UserError, match="this process"):
        RunLock(out_dir).acquire()
    lock.release()
    assert not (out_dir / LOCK_NAME).exists()
    fresh = RunLock(out_dir / "new" / "run").acquire()
    fresh.release()
    assert not (out_dir / "new").exists()  # it created them and nothing was written there


def test_refused_grouter_leaves_no_out_dir_and_names_mg_expand(tmp_path):
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter import Grouter, GrouterConfig
    from megatron_grouter.grouter.checkpoint import save_grouter

    data = tiny_dataset(tmp_path / "data")
    tokenizer = load_tokenizer(data["tokenizer"])
    torch.manual_seed(0)
    grouter = Grouter(GrouterConfig(vocab_size=tokenizer.vocab_size, num_experts=2, topk=2, hidden_size=16,
                                    num_layers=1, num_heads=2, max_seq_length=32))
    save_grouter(grouter, tmp_path / "grouter", provenance={"source_model": "random (test)"},
                 tokenizer_fingerprint=tokenizer.fingerprint())
    out_dir = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        train_in_process([*data_overrides(data), *TINY_MODEL, "router=grouter_fixed",
                          f"router.grouter.path={tmp_path / 'grouter'}", "train.steps=1",
                          f"train.out_dir={out_dir}"])
    message = str(refused.value)
    assert "has 2 experts but the model has 4" in message and "mg-expand" in message and "fold" not in message
    assert not out_dir.exists()  # no empty directory, no 0-byte metrics.jsonl


@pytest.mark.parametrize("override, needle", [
    ("train.lr=-0.001", "train.lr=-0.001 must be > 0"),
    ("train.lr=nan", "train.lr=nan must be > 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size=0 must be > 0"),
    ("train.adam_beta2=1.5", "train.adam_beta2=1.5 must be in [0, 1)"),
    ("model.hidden_dropout=-0.1", "model.hidden_dropout=-0.1 must be in [0, 1)"),
    ("train.weight_decay=-1", "train.weight_decay=-1.0 must be ≥ 0"),
])
def test_invalid_numbers_are_one_line_errors(override, needle):
    with pytest.raises(UserError) as refused:
        validate(to_train_config(compose([override])), world_size=1)
    assert needle in str(refused.value) and "\n" not in str(refused.value)


def test_cli_exits_2_on_a_negative_learning_rate(tmp_path):
    result = subprocess.run([sys.executable, "-m", "megatron_grouter.train", "train.lr=-0.001",
                             f"train.out_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: train.lr=-0.001")
    assert not (tmp_path / "run").exists()
