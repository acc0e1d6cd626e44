"""Running one tool of the pipeline: as its own Python process, or inside this one.

A job is a tool (the Hydra apps mg-train, mg-distill, mg-affinity, mg-fold, mg-tune,
mg-predispatch, and the routing-stability probe) plus its command-line arguments. `subprocess`
runs `python -m <module> <args>` with its output streamed, line by line and prefixed with the
job's label, to the console and to a log file; `in_process` composes the same Hydra config and
calls the tool's job function (no interpreter start-up: used by the tests); `torchrun` starts the
data-parallel tools with torch.distributed.run on one node (GPU clusters: the `paper` preset).

Child processes run in the caller's working directory, like the in-process jobs: relative paths
(out_dir, data.prefix, overrides) then mean the same thing to the parent and to every job, from
inside the repository or outside it. The repository is put on PYTHONPATH instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from megatron_grouter.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Tool:
    """How to start a tool: its module (+ subcommand) and, in-process, its config and job."""

    module: str
    subcommand: str | None
    config_dir: str | None  # relative to CONF_DIR; None: not a Hydra app
    config_name: str | None
    job: Callable[[], Callable]  # returns the function that runs a composed config (or argv)
    distributed: bool = False  # runs data-parallel under torchrun (launcher=torchrun)


def _train_job():
    from megatron_grouter.train import train

    return train


def _distill_job():
    from megatron_grouter.offline.distill import distill

    return distill


def _convert_job(name: str):
    def load():
        from megatron_grouter.offline import convert_cli

        return getattr(convert_cli, f"run_{name}")
    return load


def _predispatch_job():
    from megatron_grouter.offline.predispatch import predispatch

    return predispatch


def _plan_ep_job():
    from megatron_grouter.offline.plan_ep import plan_ep

    return plan_ep


def _probe_job():
    from megatron_grouter.reproduce.stability import probe_main

    return probe_main


TOOLS = {
    "train": Tool("megatron_grouter.train", None, ".", "config", _train_job, True),
    "distill": Tool("megatron_grouter.offline.distill", None, "tool", "distill", _distill_job, True),
    "affinity": Tool("megatron_grouter.offline.convert_cli", "affinity", "tool", "affinity",
                     _convert_job("affinity"), True),
    "fold": Tool("megatron_grouter.offline.convert_cli", "fold", "tool", "fold", _convert_job("fold")),
    "tune": Tool("megatron_grouter.offline.convert_cli", "tune", "tool", "tune", _convert_job("tune"), True),
    "predispatch": Tool("megatron_grouter.offline.predispatch", None, "tool", "predispatch",
                        _predispatch_job, True),
    "plan_ep": Tool("megatron_grouter.offline.plan_ep", None, "tool", "plan_ep", _plan_ep_job),
    "probe": Tool("megatron_grouter.reproduce.stability", None, None, None, _probe_job),
}

LAUNCHERS = ("subprocess", "in_process", "torchrun")


def check_launcher(launcher: str) -> None:
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher={launcher!r} is unknown; choose one of {', '.join(LAUNCHERS)}")


def run_job(tool_name: str, args: list[str], label: str, log_file: Path, launcher: str,
            threads: int, nproc_per_node: int = 1) -> None:
    """Run a tool to completion; a failure raises one UserError naming the job and its log."""
    tool = TOOLS[tool_name]
    if launcher == "in_process":
        _run_in_process(tool, args, label)
        return
    python = [sys.executable]
    if launcher == "torchrun" and tool.distributed:
        python += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}"]
    command = [*python, "-m", tool.module, *([tool.subcommand] if tool.subcommand else []), *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("WANDB_MODE", "offline")
    # A job picks its own rendezvous (a single process: a free port; torchrun --standalone: its
    # own); one inherited from this process may be a port that is still listening here.
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log, subprocess.Popen(
            command, cwd=Path.cwd(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1) as process:
        log.write("$ " + " ".join(command) + "\n")
        for line in process.stdout:
            log.write(line)
            log.flush()
            if _worth_showing(line):
                print(f"  [{label}] {line.rstrip()}", flush=True)
        status = process.wait()
    if status != 0:
        raise UserError(f"{label} failed (exit status {status}); see {log_file} — fix the cause and "
                        "rerun mg-reproduce (finished stages are skipped)")


def _worth_showing(line: str) -> bool:
    """Progress lines only: evaluations, step logs, tool summaries and errors (no warnings)."""
    text = line.strip()
    if not text or "Warning" in text or text.startswith(("warnings.warn", "/")):
        return False
    return any(word in text for word in ("eval at step", "step ", "error", "Error", "saved", "done",
                                         "tuned", "folded", "predispatch", "affinity", "probe"))


def compose_config(config_dir: str, config_name: str, overrides: list[str]):
    """Compose one of conf/'s Hydra configs here (also from inside a running Hydra app)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from megatron_grouter.app import CONF_DIR
    from megatron_grouter.training.config import register_schema

    register_schema()
    # mg-reproduce itself runs inside hydra.main, which keeps its GlobalHydra until it returns;
    # nothing reads it after the job started, so it can make room for this composition.
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str((Path(CONF_DIR) / config_dir).resolve()),
                               version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def _run_in_process(tool: Tool, args: list[str], label: str) -> None:
    import torch

    print(f"  [{label}] (in process) {tool.module} {' '.join(args)}", flush=True)
    job = tool.job()
    if tool.config_dir is None:
        job(args)
        return
    threads = torch.get_num_threads()
    cfg = compose_config(tool.config_dir, tool.config_name, args)
    try:
        job(cfg)
    finally:
        torch.set_num_threads(threads)
