"""mg-reproduce started outside the repository: its jobs run where it was started, so relative
paths mean the same to the parent and to every job."""

from pathlib import Path

from megatron_grouter.reproduce.jobs import run_job
from megatron_grouter.reproduce.pipeline import Pipeline
from tests.reproduce.reproduce_runs import compose_reproduce
from tests.tiny_dataset import TINY_MODEL, tiny_dataset


def test_subprocess_job_runs_in_the_callers_directory(tmp_path, monkeypatch):
    tiny_dataset(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # not the repository
    run_job("train", ["data.prefix=data/tiny_text_document", "data.tokenizer=data/tokenizer",
                      "data.out_dir=data", *TINY_MODEL, "train.steps=1", "train.eval_interval=0",
                      "train.out_dir=stages/run"],
            "train", Path("stages/log.txt"), launcher="subprocess", threads=1)
    assert (tmp_path / "stages" / "run" / "metrics.jsonl").is_file()  # where the parent looks


def test_relative_data_paths_are_resolved_against_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_reproduce(["experiment=quick", "name=outside", "out_dir=out",
                             "data.prefix=data/tiny_text_document", "data.tokenizer=data/tokenizer"])
    prefix, tokenizer = Pipeline(cfg).prepare_data()
    assert prefix == str(tmp_path / "data" / "tiny_text_document")
    assert tokenizer == str(tmp_path / "data" / "tokenizer")
