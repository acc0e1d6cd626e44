"""Tokens each stage of the pipeline processed: source training, distillation, tuning, target runs.

The report sets them beside the target-only figure, read two ways: a source someone else paid for
(only distillation + tuning are the method's overhead) and a source we train ourselves (the source's
tokens count too). Tokens are not equal in cost — a source token is a forward and backward of the
source MoE, a distillation token a source forward plus the small student's step, a tuning token
one Grouter forward (and a small backward) — so the counts are tokens processed, not FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_grouter.reproduce import metrics as m


def _last_tokens(path: Path) -> int | None:
    """The last "tokens" field of a JSON-lines metrics file (None when absent)."""
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "tokens" in record:
            last = int(record["tokens"])
    return last


def source_tokens(summary: dict) -> int | None:
    run = summary.get("run")
    if not run or not (Path(run) / "metrics.jsonl").is_file():
        return None
    metrics = m.read_run(run)
    return int(metrics.steps[-1]["tokens"]) if metrics.steps and "tokens" in metrics.steps[-1] else None


def distill_tokens(summary: dict) -> int | None:
    grouter = summary.get("grouter")
    if grouter is None:
        return None
    return _last_tokens(Path(grouter).parent / "distill_metrics.jsonl") or 0


def pipeline_budget(summaries: dict, suffix: str = "") -> dict:
    """{source, distill, tune} tokens of one Grouter chain (`suffix`: '', '-random', ...)."""
    return {"source": source_tokens(summaries.get("source", {})),
            "distill": distill_tokens(summaries.get("distill" + suffix, {})),
            "tune": summaries.get("tune" + suffix, {}).get("tokens")}
