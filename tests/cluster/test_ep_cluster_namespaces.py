"""The emulated cluster: a shaped, counted link between two namespaces, and teardown that leaves
nothing behind (normal exit, exception, SIGTERM)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grouter.reproduce.emulated_cluster import EmulatedCluster, missing_requirements
from tests.train_runs import repo_env

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

_SINK = """
import socket, sys
server = socket.create_server((sys.argv[1], 23457))
server.settimeout(30)
connection, _ = server.accept()
received = 0
while chunk := connection.recv(1 << 20):
    received += len(chunk)
print(received)
"""
_SEND = """
import socket, sys, time
for _ in range(200):
    try:
        connection = socket.create_connection((sys.argv[1], 23457), timeout=5)
        break
    except OSError:
        time.sleep(0.05)
connection.sendall(b"x" * int(sys.argv[2]))
connection.close()
"""


def _leftovers(cluster: EmulatedCluster) -> list[str]:
    """Namespaces or interfaces of `cluster` still present on the machine."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [name for name in cluster.namespaces + cluster.interfaces if name in namespaces or name in links]


def test_link_is_rate_limited_and_its_counters_see_the_bytes():
    payload = 2_000_000
    with EmulatedCluster(rate_mbit=40) as cluster:
        before = cluster.link_bytes()
        sink = cluster.popen(1, [sys.executable, "-c", _SINK, cluster.addresses[1]], stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        subprocess.run(cluster.command(0, [sys.executable, "-c", _SEND, cluster.addresses[1], str(payload)]),
                       check=True, timeout=60)
        received = int(sink.communicate(timeout=60)[0])
        seconds = time.monotonic() - started
        after = cluster.link_bytes()
    assert received == payload
    assert payload <= after["0->1"] - before["0->1"] < 1.1 * payload  # the payload plus TCP/IP headers
    assert after["1->0"] - before["1->0"] < 0.1 * payload  # acknowledgements only
    assert seconds >= 0.9 * payload * 8 / 40e6  # 2 MB at 40 Mbit/s: at least ~0.4 s


def test_teardown_leaves_nothing_after_normal_exit_and_exception():
    with EmulatedCluster(rate_mbit=100) as cluster:
        process = cluster.popen(0, ["sleep", "60"])
        assert cluster.exists() == cluster.namespaces and not process.poll()
    assert process.poll() is not None and _leftovers(cluster) == []

    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(rate_mbit=None) as failed:
            assert len(failed.exists()) == 2
            raise RuntimeError("boom")
    assert _leftovers(failed) == []


def test_teardown_runs_on_sigterm(tmp_path: Path):
    names = tmp_path / "names"
    script = (f"import pathlib, time\n"
              f"from megatron_grouter.reproduce.emulated_cluster import EmulatedCluster\n"
              f"cluster = EmulatedCluster(rate_mbit=100)\ncluster.create()\n"
              f"pathlib.Path({str(names)!r}).write_text(' '.join(cluster.namespaces + cluster.interfaces))\n"
              f"time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", script], env=repo_env())
    deadline = time.monotonic() + 60
    while not names.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    created = names.read_text().split()
    assert all(Path("/run/netns", name).exists() for name in created[:2])
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in created)


def test_bad_link_rate_is_one_line_user_error():
    from megatron_grouter.errors import UserError

    with pytest.raises(UserError, match="rate_mbit > 0") as error:
        EmulatedCluster(rate_mbit=-5)
    assert "\n" not in str(error.value)
