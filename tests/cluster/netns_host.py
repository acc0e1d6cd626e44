"""A second "host" on this machine: a network namespace joined to ours by a veth pair.

`NetnsHost` creates a fresh network namespace and a veth pair with one end inside it, and gives
both ends addresses from a private /30 (10.231.x.y) that no interface or route on this machine
uses yet. The namespace then has its own address (`address`) that the root namespace reaches over
the veth at `peer_address`; traffic goes only between those two addresses. Commands run inside
with `ip netns exec` (`command`, `run`, `popen`); teardown ends what `popen` started (by pid) and
deletes the veth pair and the namespace.

Needs root and iproute2; `netns_missing_requirements()` says why not.

    with NetnsHost() as host:
        host.run(["python3", "-c", "..."])      # sees only lo and the veth end `host.address`
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import os
import shutil
import subprocess
import threading
from pathlib import Path

_POOL = ipaddress.ip_network("10.231.0.0/16")
_counter = itertools.count()
_pick_lock = threading.Lock()


def _ip_binary() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


@functools.cache
def netns_missing_requirements() -> str | None:
    """Why a NetnsHost cannot be created here (None when it can); probes once with a scratch netns,
    since root in an unprivileged container may still lack CAP_SYS_ADMIN."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    ip = _ip_binary()
    if ip is None:
        return "the 'ip' command is missing; run .ci/install_slurm.sh (installs iproute2)"
    probe_name = f"mgprobe{os.getpid()}"
    created = subprocess.run([ip, "netns", "add", probe_name], capture_output=True, text=True, timeout=30)
    if created.returncode != 0:
        return f"cannot create a network namespace here: {created.stderr.strip()}"
    subprocess.run([ip, "netns", "del", probe_name], capture_output=True, timeout=30)
    return None


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network that an address or a route on this machine covers."""
    ip = _ip_binary()
    networks = []
    addresses = subprocess.run(
        [ip, "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True, timeout=30
    )
    for line in addresses.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            networks.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    routes = subprocess.run(
        [ip, "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=True, timeout=30
    )
    for line in routes.stdout.splitlines():
        destination = line.split()[0] if line.split() else ""
        if destination in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            destination = line.split()[1] if destination != "default" else ""
        try:
            networks.append(ipaddress.ip_network(destination, strict=False))
        except ValueError:
            continue
    return networks


def _pick_free_subnet() -> ipaddress.IPv4Network:
    """A /30 inside 10.231.0.0/16 that overlaps nothing in use (start point spread by pid so that
    concurrent test processes rarely race for the same block)."""
    in_use = [network for network in _networks_in_use() if network.prefixlen > 0]
    blocks = list(_POOL.subnets(new_prefix=30))
    start = (os.getpid() * 97 + next(_counter) * 13) % len(blocks)
    for offset in range(len(blocks)):
        candidate = blocks[(start + offset) % len(blocks)]
        if not any(candidate.overlaps(network) for network in in_use):
            return candidate
    raise RuntimeError(f"no free /30 left in {_POOL}")


class NetnsHost:
    """A network namespace with its own address, linked to the root namespace by a veth /30."""

    def __init__(self) -> None:
        reason = netns_missing_requirements()
        if reason is not None:
            raise RuntimeError(reason)
        tag = f"{os.getpid() % 100000:05d}{next(_counter) % 100:02d}"
        self.name = f"mgns{tag}"
        self.root_interface = f"mgv{tag}r"  # interface names: at most 15 characters
        self.inner_interface = f"mgv{tag}n"
        self.subnet: ipaddress.IPv4Network | None = None
        self._created_netns = False
        self._created_veth = False
        self._processes: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """This host's address (the veth end inside the namespace)."""
        return str(self._subnet_hosts()[1])

    @property
    def peer_address(self) -> str:
        """The root namespace's address on the veth, as this host sees it."""
        return str(self._subnet_hosts()[0])

    def _subnet_hosts(self) -> list[ipaddress.IPv4Address]:
        if self.subnet is None:
            raise RuntimeError("NetnsHost is not created; use it as a context manager or call create()")
        return list(self.subnet.hosts())

    def __enter__(self) -> NetnsHost:
        self.create()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.destroy()

    def create(self) -> None:
        """Make the namespace, the veth pair and the addresses; bring the links up."""
        try:
            self._ip("netns", "add", self.name)
            self._created_netns = True
            with _pick_lock:
                self.subnet = _pick_free_subnet()
                self._ip(
                    "link", "add", self.root_interface, "type", "veth", "peer", "name", self.inner_interface
                )
                self._created_veth = True
            self._ip("link", "set", self.inner_interface, "netns", self.name)
            self._ip("addr", "add", f"{self.peer_address}/30", "dev", self.root_interface)
            self._ip("link", "set", self.root_interface, "up")
            self._ip("-n", self.name, "addr", "add", f"{self.address}/30", "dev", self.inner_interface)
            self._ip("-n", self.name, "link", "set", self.inner_interface, "up")
            self._ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """End processes started with `popen`, delete the veth pair and the namespace."""
        for process in self._processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
        self._processes.clear()
        if self._created_veth:
            # Deleting one end deletes both, wherever the other end lives.
            self._ip("link", "del", self.root_interface, check=False)
            self._created_veth = False
        if self._created_netns:
            self._ip("netns", "del", self.name, check=False)
            self._created_netns = False
        self.subnet = None

    def exists(self) -> bool:
        """Whether the namespace is still registered with `ip netns`."""
        return Path("/run/netns", self.name).exists()

    def command(self, argv: list[str]) -> list[str]:
        """`argv` wrapped to run inside this namespace."""
        return [_ip_binary(), "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], timeout_s: float = 30.0, **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` inside the namespace to completion (captures text output by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), timeout=timeout_s, **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` inside the namespace in the background; `destroy` ends it."""
        process = subprocess.Popen(self.command(argv), **kwargs)
        self._processes.append(process)
        return process

    def _ip(self, *args: str, check: bool = True) -> None:
        result = subprocess.run([_ip_binary(), *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
