"""A listening socket of its own for each worker process, so the kernel shares connections out evenly.

uvicorn's workers share one listening socket, and whichever is awake first accepts every connection
waiting (libuv accepts until none is left). Clients keep their connections open, so a burst of new
ones (a storefront's connection pool starting, a load test's step) stays with one worker for as long
as it lasts: the serving bench's 64 connections split 51/49 to 64/36 of the two workers' CPU, step by
step, and the busier worker's queue sets the p99 while the other idles. With SO_REUSEPORT each
worker has a socket bound to the same port, and the kernel hashes each new connection to one of
them, whoever is awake.

uvicorn's supervisor stays in charge of the workers (starting, health checks, restarts, signals): it
sends each worker the sockets it was given. The socket given here is unbound in the parent; sent to a
worker, it arrives as a new socket of that worker's own, bound to the address.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def balances_connections() -> bool:
    """Whether the kernel shares connections out across sockets bound with SO_REUSEPORT (Linux does)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


class PerWorkerListener(socket.socket):
    """Stands for one listening socket per worker at (host, port): sending it to a process gives that
    process a socket of its own, bound there with SO_REUSEPORT (`bound_listener`)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(_family(host), socket.SOCK_STREAM)
        self.address = (host, port)

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return (bound_listener, self.address)


def bound_listener(host: str, port: int) -> socket.socket:
    """A socket bound at (host, port) beside the other workers' (SO_REUSEPORT), not listening yet: uvicorn
    listens on it once the app has started, so until then (a worker starting or replaced, loading the
    model) the kernel gives new connections to the workers that serve, not to this one's queue."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def ensure_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) when anything listens on the port already: sockets bound with
    SO_REUSEPORT by the same user would otherwise quietly share its connections with the new workers."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no listener
        probe.bind((host, port))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
