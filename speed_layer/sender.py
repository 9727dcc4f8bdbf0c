"""Overlapped script calls: send each chunk as soon as it is planned, read every reply at the end.

A redis-py pipeline writes nothing until `execute`, so Redis would sit idle while Python plans and
Python would sit idle while Redis runs. Writing each call to the socket at once lets Redis apply
chunk n while Python plans chunk n+1: on two cores a batch costs the slower of the two, not the sum.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis


class OverlappedCalls:
    """One connection of `client`'s pool, held from the first `send` to `replies`."""

    def __init__(self, client: redis.Redis) -> None:
        self.pool = client.connection_pool
        self.connection: Any = None
        self.sent = 0

    def send(self, *args: str | bytes | int | float) -> None:
        if self.connection is None:
            self.connection = self.pool.get_connection()
        try:
            self.connection.send_packed_command([hiredis.pack_command(args)], check_health=False)
        except BaseException:
            self._drop()
            raise
        self.sent += 1

    def replies(self) -> list[Any]:
        """Every call's reply in order; a failed call's reply is its ResponseError (NoScriptError too)."""
        out: list[Any] = []
        try:
            for _ in range(self.sent):
                try:
                    out.append(self.connection.read_response())
                except redis.ResponseError as exc:
                    out.append(exc)
        except BaseException:
            self._drop()
            raise
        if self.connection is not None:
            self.pool.release(self.connection)
            self.connection = None
        self.sent = 0
        return out

    def _drop(self) -> None:
        """A broken exchange leaves unread replies behind: the connection must not be reused."""
        if self.connection is not None:
            self.connection.disconnect()
            self.pool.release(self.connection)
            self.connection = None
        self.sent = 0
