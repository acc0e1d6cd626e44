"""Bad mg-reproduce input ends in one line naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.reproduce.routers import router_overrides
from megatron_grouter.reproduce.stages import Stage

from tests.reproduce.reproduce_runs import reproduce_in_process


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


def test_tuning_variant_row_needs_its_objective():
    with pytest.raises(UserError, match=r"grouter_tuned_kl needs tune.variants.kl .*\+tune.variants.kl=\[\"kl_weight=1\"\]"):
        router_overrides("grouter_tuned_kl", Path("raw"), Path("tuned"), Path("cache"))
    chosen = router_overrides("grouter_tuned_kl", Path("raw"), Path("tuned"), Path("cache"),
                              variants={"grouter_tuned_kl": (Path("kl-grouter"), Path("kl-cache"))})
    assert "router.grouter.path=kl-grouter" in chosen and "router.grouter.cache=kl-cache" in chosen
    assert "router.name=grouter_tuned_kl" in chosen and "router.grouter.source=cached" in chosen


def test_parallel_runs_need_the_subprocess_launcher(tmp_path):
    from tests.reproduce.reproduce_runs import compose_reproduce

    from megatron_grouter.reproduce.pipeline import Pipeline

    with pytest.raises(UserError, match="parallel_runs=2 needs launcher=subprocess"):
        Pipeline(compose_reproduce(["experiment=quick", f"out_dir={tmp_path}", "launcher=in_process",
                                    "parallel_runs=2"]))
    with pytest.raises(UserError, match="parallel_runs=0 must be >= 1"):
        Pipeline(compose_reproduce(["experiment=quick", f"out_dir={tmp_path}", "parallel_runs=0"]))


def test_a_bare_string_where_a_list_belongs_is_one_line():
    from megatron_grouter.reproduce.pipeline import _as_list

    with pytest.raises(UserError, match=r"tune.variants.kl='kl_weight=1' must be a list"):
        _as_list("kl_weight=1", "tune.variants.kl")
    assert _as_list(["mode=weights", "kl_weight=1"], "tune.variants.kl") == ["mode=weights", "kl_weight=1"]
    assert _as_list(None, "tune.objective") == []
