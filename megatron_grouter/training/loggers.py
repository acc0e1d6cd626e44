"""Where metrics go: console progress line, metrics.jsonl, tensorboard, wandb (offline by default).

Only the main rank logs. metrics.jsonl is the machine-readable record other tools (reports,
tests) read; the console line is for people.

A resumed run continues the same record: the first step it logs says where it restarted, and
whatever an earlier run wrote for that step or later (a run killed after its last checkpoint
had logged steps it never saved) is dropped from metrics.jsonl and purged from tensorboard
before the step is written again. wandb keeps one run per out_dir across requeues: its id is
kept in `<out_dir>/wandb_run_id` and every run resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path

from megatron_grouter.atomic_files import write_text_atomic
from megatron_grouter.errors import UserError
from megatron_grouter.training.config import LoggerConfig

log = logging.getLogger("megatron_grouter")


class MetricsLogger:
    """Opens its files at the first `log`, not when built: a run refused after the trainer was
    built (a foreign Grouter or cache) leaves no out_dir with an empty metrics.jsonl."""

    def __init__(self, config: LoggerConfig, out_dir: Path, enabled: bool, run_config: dict):
        self.enabled = enabled
        self.config = config
        self.out_dir = Path(out_dir)
        self.run_config = run_config
        self.jsonl = None
        self.tensorboard = None
        self.wandb_run = None
        # A damaged id file is refused before training starts, not at the first log.
        self.wandb_id = saved_wandb_run_id(self.out_dir) if enabled and config.wandb else None

    def _open(self, first_step: int) -> None:
        config, out_dir = self.config, self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = out_dir / "metrics.jsonl"
        dropped = drop_records_from(metrics_path, first_step)
        if dropped:
            log.info("metrics.jsonl: dropped %d record(s) of step %d or later left by an earlier "
                     "run; this run logs those steps again", dropped, first_step)
        self.jsonl = open(metrics_path, "a")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"),
                                             purge_step=first_step)
        if config.wandb:
            os.environ.setdefault("WANDB_MODE", config.wandb_mode)
            import wandb

            # Steps an earlier run logged past its last checkpoint are logged again; wandb ignores
            # (with a warning) a step below one it already holds: the same values, as the resume
            # is deterministic.
            self.wandb_run = wandb.init(project=config.wandb_project, dir=str(out_dir),
                                        config=self.run_config, mode=config.wandb_mode,
                                        id=self.wandb_id or new_wandb_run_id(out_dir),
                                        resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open(first_step=step)
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        numeric = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(numeric, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


WANDB_ID_FILE = "wandb_run_id"
_WANDB_ID = re.compile(r"[a-z0-9]{1,64}")


def saved_wandb_run_id(out_dir: Path) -> str | None:
    """The wandb run id the first run of this out_dir saved in `wandb_run_id` (None: no run yet)."""
    path = Path(out_dir) / WANDB_ID_FILE
    if not path.exists():
        return None
    run_id = path.read_text(errors="replace").strip()
    if not _WANDB_ID.fullmatch(run_id):
        raise UserError(f"{path} holds {run_id[:80]!r}, not a wandb run id (1-64 of a-z, 0-9); "
                        "fix it, or delete it to start a new wandb run")
    return run_id


def new_wandb_run_id(out_dir: Path) -> str:
    """A fresh wandb run id, saved (atomically) in `<out_dir>/wandb_run_id` for every later run
    of this out_dir (a Slurm requeue) to resume."""
    run_id = uuid.uuid4().hex[:16]
    write_text_atomic(Path(out_dir) / WANDB_ID_FILE, run_id + "\n")
    return run_id


def drop_records_from(path: Path, first_step: int) -> int:
    """Rewrite `path` (metrics.jsonl) atomically without its records of `first_step` or later
    and without a line torn by a kill mid-write; returns how many lines went (0: untouched)."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None  # torn by a kill in the middle of a write
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and step < first_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
    return dropped


def setup_console_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    # Hydra's logging setup disables loggers created before it ran (ours, at import time).
    logging.getLogger("megatron_grouter").disabled = False
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
