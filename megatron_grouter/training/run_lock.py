"""One run per out_dir: an fcntl lock held by rank 0 for the whole run.

Two jobs writing into one out_dir interleave one metrics.jsonl and race on step_N.tmp
checkpoints; the second must refuse, in one line that names the holder. The lock is a POSIX record lock
(fcntl.lockf) on <out_dir>/.run.lock: the kernel releases it when the holder dies, so a killed
run never leaves a stale lock, and unlike flock it is not shared with forked children (a
checkpoint writer or DataLoader worker that outlives a killed trainer does not keep the run
locked). The file records the holder's pid and host for the refusal. POSIX locks do not exclude
within one process, so this process's own locks are also kept in a set.

A run refused later (a bad Grouter, a foreign cache) must not leave an empty out_dir behind:
release removes the lock file, and out_dir too when this run created it and nothing else was
written there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megatron_grouter.errors import UserError

LOCK_NAME = ".run.lock"
_held_here: set[str] = set()  # out_dirs locked by this process


class RunLock:
    """An exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.handle = None
        self.created: list[Path] = []  # directories this lock made, deepest first

    def acquire(self) -> "RunLock":
        missing, directory = [], self.out_dir.absolute()
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"train.out_dir={self.out_dir} cannot be created ({error.strerror}); choose "
                            "a writable directory") from None
        key = str(self.out_dir.resolve())
        if key in _held_here:
            raise UserError(f"train.out_dir={self.out_dir} is in use by another run (pid {os.getpid()}, this "
                            "process); wait for it to finish or choose another train.out_dir")
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EAGAIN):
                    handle.close()
                    raise UserError(f"train.out_dir={self.out_dir}: cannot lock {self.path} "
                                    f"({error.strerror}); use a local file system or another out_dir") from None
                holder = _describe_holder(self.path)
                handle.close()
                raise UserError(f"train.out_dir={self.out_dir} is in use by another run ({holder}); wait "
                                "for it to finish, stop it, or choose another train.out_dir") from None
            # The holder before us may have removed the file after we opened it: lock the live one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self.handle = handle
        self.created = missing
        self.key = key
        _held_here.add(key)
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then retries on a new file
        finally:
            fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            _held_here.discard(self.key)
        for directory in self.created:
            try:
                directory.rmdir()  # only succeeds when the run wrote nothing there
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return f"lock file {path}"


def hold_run_lock(out_dir: str | os.PathLike, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns the outcome, so a refused job stops everywhere
    with the same one line instead of leaving the other ranks waiting in a collective."""
    import torch.distributed as dist

    lock, refusal = None, None
    if is_main:
        try:
            lock = RunLock(out_dir).acquire()
        except UserError as error:
            refusal = str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise UserError(refusal)
    return lock
