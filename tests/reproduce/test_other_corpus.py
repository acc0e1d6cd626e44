"""mg-reproduce end to end on a corpus other than the built-in one, given as data.corpus= (a directory
of text files on disk, preprocessed by the pipeline), with the issue-25 rows: every headline baseline
including hash, the tuned Grouter and both controls (grouter_random, grouter_warm), routed online."""

from __future__ import annotations

import json

from tests.reproduce.reproduce_runs import micro_overrides, reproduce_in_process

ROUTERS = ["aux_loss", "hash", "grouter_tuned", "grouter_random", "grouter_warm"]
WORDS = ("river stone lantern orchard harbor meadow ember quartz willow signal cobalt thistle granite "
         "saffron beacon tundra").split()


def write_text_corpus(directory, documents: int = 60) -> None:
    directory.mkdir(parents=True)
    for index in range(documents):
        lines = [" ".join(WORDS[(index * 7 + line * 3 + word) % len(WORDS)] for word in range(5 + line % 9))
                 + f" {index * line}." for line in range(40 + index % 25)]
        (directory / f"note_{index:03d}.txt").write_text(f"Note {index}\n" + "\n".join(lines) + "\n")


def test_pipeline_runs_on_a_directory_corpus_with_the_controls(tmp_path):
    corpus = tmp_path / "notes"
    write_text_corpus(corpus)
    out_dir = tmp_path / "run"
    data = {"prefix": "", "tokenizer": ""}
    overrides = [item for item in micro_overrides(out_dir, data, ROUTERS, [1])
                 if not item.startswith(("data.prefix=", "data.tokenizer=", "plan."))]
    report = reproduce_in_process([*overrides, f"data.corpus={corpus}", f"data.out_dir={tmp_path / 'data'}",
                                   "data.vocab_size=300", "data.max_documents=null", "plan.enabled=false",
                                   "target.grouter_source=online", "target.warm_tokens=256",
                                   "headline.baselines=[aux_loss,hash]"])
    assert (tmp_path / "data" / "notes_text_document.bin").is_file()  # preprocessed from the directory
    text = report.read_text()
    assert f"Corpus: {corpus}, preprocessed into" in text
    assert "## Headline (pre-registered)" in text and "the fixed hash included" in text
    assert "Control `grouter_random`" in text and "Control `grouter_warm`" in text
    assert "## Token budget of the whole pipeline" in text
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["per_seed"]["1"]["baselines"] == ["aux_loss", "hash"]
    assert summary["headline"]["verdict"] in ("met", "missed")
    assert "predispatch" not in summary["stages"]  # online routing: no cache
    assert summary["stages"]["distill-random"]["step"] == 0  # the random Grouter is never distilled
    assert summary["stages"]["tune-random"]["objective"] == "bias"
    assert set(summary["headline"]["controls"]) == {"grouter_random", "grouter_warm"}
    assert summary["headline"]["budget"]["chain"]["source"] > 0
    # grouter_warm followed the tuned Grouter for its first 2 steps (2 × 128 tokens): the same experts as the
    # grouter_tuned run on the same data (identical per-step load imbalance), then its own top-k.
    def max_vio(router: str) -> dict[int, float]:
        path = out_dir / "stages" / f"target-{router}-s1" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return {record["step"]: record["moe/max_vio"] for record in records if "moe/max_vio" in record}
    warm, tuned = max_vio("grouter_warm"), max_vio("grouter_tuned")
    assert warm[1] == tuned[1] and warm[2] == tuned[2]
    assert (warm[3], warm[4]) != (tuned[3], tuned[4])
