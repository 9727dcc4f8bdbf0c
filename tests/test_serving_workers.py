"""`recs serve --workers 2` for real: a listening socket per worker, new connections shared out by the kernel,
a worker killed with SIGKILL replaced on its own socket, and a port in use refused instead of shared."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.serve import SyntheticModel
from common.redis_server import free_port

# The fixtures (model_template, published) live in the support module.
pytest_plugins = ["tests.test_serving_support"]

WORKERS = 2
CONNECTIONS = 64


def _listeners(server: subprocess.Popen[bytes], port: int) -> dict[int, str]:
    """worker pid -> the inode of the socket it listens on at `port` (each worker's own), from one
    consistent look: a worker starting to listen may renumber the socket's descriptor meanwhile."""
    for _ in range(100):
        try:
            return _listening_sockets(server, port)
        except FileNotFoundError:
            time.sleep(0.02)
    raise AssertionError("no consistent look at the workers' sockets")


def _listening_sockets(server: subprocess.Popen[bytes], port: int) -> dict[int, str]:
    found: dict[int, str] = {}
    for pid, conns in _connections(server).items():
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                target = os.readlink(f"/proc/{pid}/fd/{conn.fd}")
                if not target.startswith("socket:"):  # the descriptor was closed and reused since
                    raise FileNotFoundError(target)
                found[pid] = target
    return found


def _established(server: subprocess.Popen[bytes], port: int) -> dict[int, int]:
    """worker pid -> how many client connections to `port` it holds."""
    held = {
        pid: sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in conns)
        for pid, conns in _connections(server).items()
    }
    return {pid: count for pid, count in held.items() if count}


def _connections(server: subprocess.Popen[bytes]) -> dict[int, list[Any]]:
    """worker pid -> its TCP sockets, for the server's live children."""
    found: dict[int, list[Any]] = {}
    for child in psutil.Process(server.pid).children():
        try:
            found[child.pid] = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:  # a worker that just died (or a zombie not reaped yet)
            continue
    return found


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextmanager
def _answered_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    """`n` keep-alive connections, each answered once (so each has been accepted by a worker), open
    until the block ends."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(n)]
    try:
        for conn in conns:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        for conn in conns:
            assert conn.recv(64).startswith(b"HTTP/1.1 200"), "every connection is answered"
        yield conns
    finally:
        for conn in conns:
            conn.close()


@pytest.fixture
def server(published: SyntheticModel, recs_env: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = (recs_env / "serve.log").open("wb")  # read on failure: what the supervisor and workers said
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--workers", str(WORKERS), "--port", str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait(lambda: len(_listeners(process, port)) == WORKERS, 120, "both workers to listen")
        yield process, port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_each_worker_listens_on_its_own_socket_and_takes_a_share_of_new_connections(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = server
    listeners = _listeners(process, port)
    assert len(set(listeners.values())) == WORKERS, listeners  # not one socket shared by both
    with _answered_connections(port, CONNECTIONS):
        held = _established(process, port)
    assert set(held) == set(listeners) and sum(held.values()) == CONNECTIONS, held
    # Hashed by the kernel: a share outside 12..52 of 64 has odds of about 1 in 10 million.
    assert all(12 <= count <= CONNECTIONS - 12 for count in held.values()), held


def test_a_killed_worker_is_replaced_on_a_socket_of_its_own_and_every_connection_is_served(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = server
    before = _listeners(process, port)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:  # one snapshot: the supervisor may restart a worker again meanwhile
        now = _listeners(process, port)
        return victim not in now and len(set(now.values())) == WORKERS and before[victim] not in now.values()

    _wait(replaced, 120, "a replacement worker on a socket of its own")
    with _answered_connections(port, CONNECTIONS):
        pass


def test_a_second_server_on_a_port_in_use_is_refused_not_given_a_share(
    server: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = server
    second = subprocess.run(
        [sys.executable, "-m", "serving.cli", "--workers", str(WORKERS), "--port", str(port)],
        env=dict(os.environ), capture_output=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0
    assert f"cannot serve on 127.0.0.1:{port}" in second.stderr.decode()
    assert len(_listeners(process, port)) == WORKERS  # the first server still serves
