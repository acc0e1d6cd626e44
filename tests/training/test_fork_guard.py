"""A process forked by the trainer (megatron's checkpoint writers are) dies when the trainer is
killed, instead of hanging on as an orphan."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.train_runs import REPO

TRAINER = textwrap.dedent("""
    import multiprocessing, sys, time
    from megatron_grouter.training import fork_guard
    if sys.argv[1] == "guarded":
        fork_guard.install()
    def write_bucket():  # stands in for FileSystemWriterAsync.write_preloaded_data
        time.sleep(120)
    writer = multiprocessing.get_context("fork").Process(target=write_bucket)  # as megatron forks
    writer.start()
    print(writer.pid, flush=True)
    time.sleep(120)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def writer_outlives_a_killed_trainer(mode: str) -> bool:
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, mode], stdout=subprocess.PIPE, text=True,
                               cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    writer = int(trainer.stdout.readline())
    try:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 10
        while alive(writer) and time.monotonic() < deadline:
            time.sleep(0.05)
        return alive(writer)
    finally:
        if alive(writer):
            os.kill(writer, signal.SIGKILL)


def test_forked_writer_dies_with_the_killed_trainer():
    assert writer_outlives_a_killed_trainer("unguarded")  # what happened before: an orphan
    assert not writer_outlives_a_killed_trainer("guarded")
