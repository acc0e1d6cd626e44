"""Bad mg-reproduce input ends in one line naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce.routers import router_overrides
from megatron_grouter.reproduce.stages import Stage

from reproduce_runs import reproduce_in_process


def test_unknown_target_router():
    with pytest.raises(UserError, match="target router 'grouter_magic' is unknown"):
        router_overrides("grouter_magic", Path("raw"), Path("tuned"), Path("cache"))


def test_unknown_launcher(tmp_path):
    with pytest.raises(UserError, match="launcher='slurmish' is unknown"):
        reproduce_in_process(["experiment=quick", f"out_dir={tmp_path}", "launcher=slurmish"])


def test_missing_hf_source(tmp_path, micro_corpus):
    with pytest.raises(UserError, match="source.hf_path=.* is not a directory"):
        reproduce_in_process(["experiment=quick", f"out_dir={tmp_path}", f"source.hf_path={tmp_path / 'none'}",
                              f"data.prefix={micro_corpus['prefix']}", f"data.tokenizer={micro_corpus['tokenizer']}"])


def test_stage_keys_follow_settings_and_inputs(tmp_path):
    stage = Stage("tune", tmp_path / "tune", {"args": ["max_tokens=10"]}, ["upstream-a"])
    assert stage.begin() == "fresh" and stage.finished() is None
    stage.finish({"grouter": "g"})
    assert stage.finished() == {"grouter": "g"}
    (stage.directory / "partial").write_text("x")
    assert Stage("tune", tmp_path / "tune", {"args": ["max_tokens=10"]}, ["upstream-b"]).finished() is None
    changed = Stage("tune", tmp_path / "tune", {"args": ["max_tokens=20"]}, ["upstream-a"])
    assert changed.begin() == "reset" and not (stage.directory / "partial").exists()
    again = Stage("tune", tmp_path / "tune", {"args": ["max_tokens=20"]}, ["upstream-a"])
    assert again.begin() == "resume"  # same key, never finished: the tool resumes in place


def test_bidirectional_row_needs_its_chain():
    with pytest.raises(UserError, match="grouter_tuned_bidirectional needs the bidirectional Grouter chain"):
        router_overrides("grouter_tuned_bidirectional", Path("raw"), Path("tuned"), Path("cache"))
