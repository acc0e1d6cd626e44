"""A rank that died, named in one line instead of the survivors' gloo tracebacks.

When one process of a job dies (killed, out of memory), the others fail in their next collective
with gloo's "Connection reset by peer" / "Connection closed by peer", which names an address and
port, not a rank. So each rank records its pid and host in the process group's store when the group
starts (`announce_rank`); a survivor that hits such an error looks the ranks up (`dead_ranks`: a
recorded pid on this host that no longer runs) and `peer_failure_line` says which rank died.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket

import torch.distributed as dist

KEY = "megatron_grouter/rank/{rank}"
PEER_LOST = re.compile(r"Connection (?:reset|closed) by peer(?: \[([^\]]+)\]:(\d+))?")


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


# The store, rank and world size of the group this process announced itself in: a survivor
# reports after its process group was torn down (the app's `finally` runs first).
_announced: dict = {}


def announce_rank() -> None:
    """Record this rank's pid and host in the default group's store (best effort)."""
    store = _store()
    if store is None:
        return
    try:
        store.set(KEY.format(rank=dist.get_rank()),
                  json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    except (RuntimeError, OSError):
        return
    _announced.update(store=store, rank=dist.get_rank(), world_size=dist.get_world_size())


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a killed child not yet reaped by torchrun is a zombie
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def dead_ranks() -> list[tuple[int, dict]]:
    """(rank, record) of ranks on this host whose recorded process no longer runs."""
    store = _announced.get("store")
    if store is None:
        return []
    try:
        store.set_timeout(datetime.timedelta(seconds=2))
    except (RuntimeError, AttributeError):
        pass
    host, dead = socket.gethostname(), []
    for rank in range(_announced["world_size"]):
        if rank == _announced["rank"]:
            continue
        try:
            record = json.loads(store.get(KEY.format(rank=rank)))
        except (RuntimeError, OSError, ValueError):
            continue  # the store went down with its host, or the rank never announced itself
        if record.get("host") == host and not _is_running(int(record["pid"])):
            dead.append((rank, record))
    return dead


def _peer_error(error: BaseException) -> re.Match | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError):
            match = PEER_LOST.search(str(error))
            if match:
                return match
        error = error.__cause__ or error.__context__
    return None


def peer_failure_line(error: BaseException) -> str | None:
    """One line naming the rank(s) that died, when `error` is a collective that lost its peer;
    None for any other error."""
    match = _peer_error(error)
    if match is None:
        return None
    me = f"rank {_announced['rank']}" if "rank" in _announced else "this rank"
    address = f" at {match.group(1)}:{match.group(2)}" if match.group(1) else ""
    dead = dead_ranks()
    if dead:
        names = ", ".join(f"rank {rank} (pid {record['pid']} on {record['host']})" for rank, record in dead)
        what = f"{names} died"
    else:
        what = f"a peer rank{address} died or closed its connection"
    return (f"{what}, so {me} stops ({match.group(0).split(' [')[0]}); look at that rank's log for why, "
            "then restart the job (torchrun --max-restarts resumes from the last checkpoint)")
