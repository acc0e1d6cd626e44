"""A NetnsHost is a separate network host: TCP between it and the root namespace, clean teardown."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.cluster.netns_host import NetnsHost, netns_missing_requirements

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(netns_missing_requirements() is not None, reason=str(netns_missing_requirements())),
]

_ECHO_SERVER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
server.settimeout(20)
connection, _ = server.accept()
connection.settimeout(20)
data = connection.recv(1024)
connection.sendall(b"echo:" + data)
connection.close()
"""


def _connect_with_retry(address: str, port: int, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection((address, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def test_tcp_echo_between_root_namespace_and_netns_host() -> None:
    with NetnsHost() as host:
        port = 23456
        server = host.popen([sys.executable, "-c", _ECHO_SERVER, host.address, str(port)])
        with _connect_with_retry(host.address, port, timeout_s=15) as connection:
            connection.sendall(b"hello")
            reply = connection.recv(1024)
        assert server.wait(timeout=15) == 0
    assert reply == b"echo:hello"


def test_netns_host_sees_only_its_own_addresses() -> None:
    with NetnsHost() as host:
        addresses = host.run(["ip", "-4", "-o", "addr", "show"]).stdout
        assert f"inet {host.address}/30" in addresses
        assert addresses.count(" inet ") == 2  # lo and the veth end, nothing of the root namespace
        assert host.address != host.peer_address


def test_teardown_removes_namespace_and_veth() -> None:
    host = NetnsHost()
    host.create()
    root_veth = host.root_interface
    address = host.address
    assert host.exists() and _link_exists(root_veth)

    host.destroy()

    assert not host.exists()
    assert not _link_exists(root_veth)
    root_addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    assert address not in root_addresses
