"""Emulated nodes on one machine: network namespaces joined by one shaped veth link.

`EmulatedCluster(nodes=2, ...)` makes a network namespace per node and one veth pair between
node 0 and node 1 (10.233.0.1 and .2 /30: the namespaces are private, so these addresses clash with
nothing on the host). Each direction of the link is shaped on its sending end by a token bucket
(tc tbf) at `rate_mbit`; no delay is added (netem, the delay qdisc, is often missing from container
kernels; per-message cost is then what TCP and gloo take, measured rather than set). Processes started in a node see only `lo`
and that node's link end, so a rank binds gloo to its node's address: ranks of one node talk to
each other over that address (local delivery, never the link), ranks of different nodes over the
shaped link. `link_bytes()` reads the link's kernel byte counters (bytes sent each way, headers
included) — what crossed between the nodes.

Teardown (`destroy`, the context manager's exit, and SIGINT/SIGTERM while a cluster is up) ends
the processes it started, then deletes the namespaces (which deletes the veth pair with them).
Needs root and iproute2 with tc; `missing_requirements()` says why not.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from megatron_grouter.errors import UserError

NODE_ADDRESSES = ("10.233.0.1", "10.233.0.2")
_counter = itertools.count()
_live: list["EmulatedCluster"] = []


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


@functools.cache
def missing_requirements() -> str | None:
    """Why an EmulatedCluster cannot be made here (None when it can); probes with a scratch netns
    and a tbf qdisc (root in a container may lack CAP_SYS_ADMIN, a kernel may lack sch_tbf)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _binary("ip") is None or _binary("tc") is None:
        return "the 'ip' and 'tc' commands are missing; install iproute2"
    probe = f"mgcprobe{os.getpid()}"
    made = subprocess.run([_binary("ip"), "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        shaped = subprocess.run([_binary("tc"), "-n", probe, "qdisc", "add", "dev", "lo", "root", *_tbf(100.0)],
                                capture_output=True, text=True, timeout=30)
        if shaped.returncode != 0:
            return f"tc tbf is not available here: {shaped.stderr.strip()}"
    finally:
        subprocess.run([_binary("ip"), "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _on_signal(signum, frame):
    for cluster in list(_live):
        cluster.destroy()
    raise SystemExit(128 + signum)


class EmulatedCluster:
    """Two network namespaces ("nodes") linked by a veth pair, rate-limited in both directions."""

    def __init__(self, rate_mbit: float | None, nodes: int = 2):
        if nodes != 2:
            raise UserError(f"an emulated cluster has 2 nodes (one link); got nodes={nodes}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise UserError(f"the link needs rate_mbit > 0 (or none: unshaped); got {rate_mbit}")
        reason = missing_requirements()
        if reason is not None:
            raise RuntimeError(reason)
        tag = f"{os.getpid() % 100000:05d}{next(_counter) % 100:02d}"
        self.namespaces = [f"mgc{tag}n{node}" for node in range(nodes)]
        self.interfaces = [f"mgc{tag}v{node}" for node in range(nodes)]  # ≤ 15 characters
        self.rate_mbit = rate_mbit
        self._created: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._previous_handlers: dict[int, object] = {}

    @property
    def addresses(self) -> tuple[str, ...]:
        return NODE_ADDRESSES

    def describe(self) -> str:
        rate = "unshaped" if self.rate_mbit is None else f"{self.rate_mbit:g} Mbit/s"
        return f"2 nodes, one veth link, {rate} each way (tc tbf), no added delay"

    def __enter__(self) -> "EmulatedCluster":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        if not _live:  # the first live cluster takes over SIGINT/SIGTERM so teardown runs on them
            for signum in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous_handlers[signum] = signal.signal(signum, _on_signal)
                except ValueError:  # not the main thread: the caller's finally must tear down
                    pass
        _live.append(self)
        try:
            for name in self.namespaces:
                self._ip("netns", "add", name)
                self._created.append(name)
            self._ip("-n", self.namespaces[0], "link", "add", self.interfaces[0], "type", "veth", "peer", "name",
                     self.interfaces[1], "netns", self.namespaces[1])
            for name, interface, address in zip(self.namespaces, self.interfaces, NODE_ADDRESSES):
                self._ip("-n", name, "addr", "add", f"{address}/30", "dev", interface)
                self._ip("-n", name, "link", "set", interface, "up")
                self._ip("-n", name, "link", "set", "lo", "up")
                self._shape(name, interface)
        except BaseException:
            self.destroy()
            raise

    def _shape(self, namespace: str, interface: str) -> None:
        if self.rate_mbit is not None:
            _run([_binary("tc"), "-n", namespace, "qdisc", "add", "dev", interface, "root", *_tbf(self.rate_mbit)])

    def destroy(self) -> None:
        """End what `popen` started, delete the namespaces (and so the link). Safe to call twice."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._processes.clear()
        for name in reversed(self._created):
            subprocess.run([_binary("ip"), "netns", "del", name], capture_output=True, timeout=30)
        self._created.clear()
        if self in _live:
            _live.remove(self)
            if not _live:
                for signum, handler in self._previous_handlers.items():
                    signal.signal(signum, handler)
                self._previous_handlers.clear()

    def exists(self) -> list[str]:
        """The namespaces of this cluster still registered with `ip netns` (empty after destroy)."""
        return [name for name in self.namespaces if Path("/run/netns", name).exists()]

    def command(self, node: int, argv: list[str]) -> list[str]:
        return [_binary("ip"), "netns", "exec", self.namespaces[node], *argv]

    def popen(self, node: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside node `node`; `destroy` ends it if it is still running."""
        process = subprocess.Popen(self.command(node, argv), **kwargs)
        self._processes.append(process)
        return process

    def _ip(self, *args: str) -> None:
        _run([_binary("ip"), *args])

    def link_bytes(self) -> dict[str, int]:
        """Bytes sent so far over the link: node 0 → node 1, node 1 → node 0 (kernel counters)."""
        sent = []
        for name, interface in zip(self.namespaces, self.interfaces):
            shown = _run([_binary("ip"), "-n", name, "-j", "-s", "link", "show", "dev", interface])
            sent.append(int(json.loads(shown)[0]["stats64"]["tx"]["bytes"]))
        return {"0->1": sent[0], "1->0": sent[1]}


def _tbf(rate_mbit: float) -> list[str]:
    # burst ≥ one 64 KiB GSO segment (tbf would split or drop bigger ones); a deep queue so that
    # TCP is paced by the rate, not by drops
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", "128kb", "limit", "16mb"]


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout

