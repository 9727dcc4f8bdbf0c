"""A lane of calls: write each call at once, read the replies later, in order.

A redis-py pipeline writes nothing until `execute`, so Redis would sit idle while Python plans and
Python would sit idle while Redis runs. Writing each call to the socket at once lets Redis apply
chunk n while Python plans chunk n+1, and batch n while Python reads and plans batch n+1: on two
cores a batch costs the slower of the two, not the sum. One connection keeps the calls in order.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis


class Lane:
    """One connection of `client`'s pool, held until `reset`."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.connection: Any = None
        self.unread = 0

    def open(self) -> None:
        """Connect now: a connection opened later waits for its handshake behind the scripts queued
        in Redis (tens of ms under load)."""
        if self.connection is None:
            self.connection = self.pool.get_connection()

    def send(self, *args: str | bytes | int | float) -> None:
        self.open()
        try:
            self.connection.send_packed_command([hiredis.pack_command(args)], check_health=False)  # type: ignore[arg-type]  # hiredis' stub types a 1-tuple
        except BaseException:
            self.reset()
            raise
        self.unread += 1

    def read(self, calls: int) -> list[Any]:
        """The next `calls` replies in order; a failed call's reply is its ResponseError (NoScriptError too)."""
        assert calls <= self.unread, f"reading {calls} replies, {self.unread} unread"
        out: list[Any] = []
        try:
            for _ in range(calls):
                try:
                    out.append(self.connection.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
                self.unread -= 1
        except BaseException:
            self.reset()
            raise
        return out

    def reset(self) -> None:
        """A broken exchange leaves unread replies behind: the connection must not be reused."""
        if self.connection is not None:
            self.connection.disconnect()
            self.pool.release(self.connection)
            self.connection = None
        self.unread = 0
