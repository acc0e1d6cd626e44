"""What every Hydra entry point shares: where the configs are, and how a user error ends a run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from megatron_grouter.errors import UserError

# The Hydra configs ship inside the package (megatron_grouter/conf/, package data of the wheel), so
# an installed copy finds them without a source checkout. A wheel installs unpacked, so this is a
# real directory: hydra.main(config_path=...) and initialize_config_dir both take it as it is.
# MG_CONF_DIR points every app at another tree of the same layout (a user's edited copy).
CONF_DIR = Path(os.environ.get("MG_CONF_DIR") or Path(__file__).resolve().parent / "conf")


def run_app(job: Callable, cfg) -> object:
    """Run a job; a UserError prints one line `error: ...` and exits with status 2. A collective
    that lost a peer rank (it died) prints one line naming that rank and exits with status 1."""
    try:
        return job(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as error:
        from megatron_grouter.runtime.peer_failure import peer_failure_line

        line = peer_failure_line(error)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


def command_status(job: Callable[[], object]) -> int:
    """The exit status of an argparse command: 0, or 2 after printing a UserError's one line."""
    try:
        job()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
