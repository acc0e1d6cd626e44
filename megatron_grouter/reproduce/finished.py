"""What an out_dir already holds: the finished stages' summaries and target runs (report_only=true).

A report can be written from the finished stages while others are still missing (a run stopped by a
deadline): every stage directory with a done.json counts, in the order the stages finished; the
report says how many of the preset's target runs it holds and which are missing.
"""

from __future__ import annotations

import json
from pathlib import Path


def _done(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_stages(out_dir: Path) -> tuple[dict[str, dict], dict[tuple[str, int], Path]]:
    """({stage: summary} of every finished non-target stage, {(router, seed): run dir} of every
    finished target run), in the order they finished."""
    stages = sorted(((directory, _done(directory)) for directory in (Path(out_dir) / "stages").glob("*")),
                    key=lambda item: (item[0] / "done.json").stat().st_mtime if item[1] else 0)
    summaries, runs = {}, {}
    for directory, record in stages:
        if record is None:
            continue
        name = record.get("stage", directory.name)
        if name.startswith("target-"):
            router, seed = name[len("target-"):].rsplit("-s", 1)
            runs[(router, int(seed))] = Path(record["summary"].get("run", directory))
        else:
            summaries[name] = record.get("summary", {})
    return summaries, runs


def missing_runs(runs: dict[tuple[str, int], Path], routers: list[str], seeds: list[int]) -> list[str]:
    return [f"{router}-s{seed}" for seed in seeds for router in routers if (router, seed) not in runs]
