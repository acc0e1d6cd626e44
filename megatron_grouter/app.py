"""What every Hydra entry point shares: where conf/ is, and how a user error ends a run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from megatron_grouter.errors import UserError

CONF_DIR = Path(os.environ.get("MG_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))


def run_app(job: Callable, cfg) -> object:
    """Run a job; a UserError prints one line `error: ...` and exits with status 2."""
    try:
        return job(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def command_status(job: Callable[[], object]) -> int:
    """The exit status of an argparse command: 0, or 2 after printing a UserError's one line."""
    try:
        job()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
