"""Forked helper processes die with the training process instead of outliving it.

megatron-core's dist_checkpointing writes every checkpoint (the synchronous save too) through
FileSystemWriterAsync.write_preloaded_data_multiproc, which forks `thread_count` (2) non-daemon
writer processes per rank (multiprocessing's fork context). When the trainer is killed mid-save
those children are orphaned: they keep a copy-on-write image of the trainer (hundreds of MB) and
can block for good on queues whose other end died (a sibling still holds the pipe open), which
is the hung writer seen after a kill. Asking the kernel to SIGKILL each forked child when its
parent dies (prctl PR_SET_PDEATHSIG) ends them with it; a half-written step_N.tmp is never
"complete" (no train_state.json), so nothing is lost that a finished save would have kept.

Only Python-level os.fork() runs these hooks; subprocess and the spawn context (exec) do not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_installed = False
_parent_pid: int | None = None


def _before_fork() -> None:
    global _parent_pid
    _parent_pid = os.getpid()


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if _parent_pid is not None and os.getppid() != _parent_pid:
        os._exit(1)  # the parent died between fork and prctl: the signal will never come


def install() -> bool:
    """From now on, every child this process forks is killed when this process dies (Linux)."""
    global _installed
    if _installed:
        return True
    if not sys.platform.startswith("linux"):
        return False
    os.register_at_fork(before=_before_fork, after_in_child=_die_with_parent)
    _installed = True
    return True
