"""Where metrics go: console progress line, metrics.jsonl, tensorboard, wandb (offline by default).

Only the main rank logs. metrics.jsonl is the machine-readable record other tools (reports,
tests) read; the console line is for people.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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

    def _open(self) -> None:
        config, out_dir = self.config, self.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if config.wandb:
            os.environ.setdefault("WANDB_MODE", config.wandb_mode)
            import wandb

            self.wandb_run = wandb.init(project=config.wandb_project, dir=str(out_dir),
                                        config=self.run_config, mode=config.wandb_mode)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
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


def setup_console_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True)
    # Hydra's logging setup disables loggers created before it ran (ours, at import time).
    logging.getLogger("megatron_grouter").disabled = False
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
