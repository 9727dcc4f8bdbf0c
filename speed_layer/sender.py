"""A lane of calls: write each call at once, read the replies later, in order.

A redis-py pipeline writes nothing until `execute`, so Redis would sit idle while Python plans and
Python would sit idle while Redis runs. Writing each call to the socket at once lets Redis apply
chunk n while Python plans chunk n+1, and batch n while Python reads and plans batch n+1: on two
cores a batch costs the slower of the two, not the sum. One connection keeps the calls in order.

A Redis Cluster has no one connection: there `ClusterLane` keeps the calls until their replies are
read, then sends them as one pipeline, which redis-py splits per node (one round trip each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
import redis

from common.redis_server import is_cluster


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
        self.send_all((args,))

    def send_all(self, calls: Sequence[Sequence[str | bytes | int | float]]) -> None:
        """`calls` in one write: a batch's reads are hundreds of small commands (an HGET a category-less
        item), and a write each is a system call each."""
        if not calls:
            return
        self.open()
        try:
            # hiredis' stub types its argument as a 1-tuple; it takes a tuple of any length.
            packed = b"".join(hiredis.pack_command(tuple(call)) for call in calls)  # type: ignore[arg-type]
            self.connection.send_packed_command([packed], check_health=False)
        except BaseException:
            self.reset()
            raise
        self.unread += len(calls)

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


class ClusterLane:
    """A Lane's calls on a Redis Cluster: held until read, then sent as one pipeline of the cluster
    client (per node, in order within each node). An MGET is sent as one GET a key (its keys may
    live on several nodes) and its reply put back together as one list."""

    def __init__(self, client: redis.Redis, replicas: int = 0, timeout_ms: int = 1000) -> None:
        self.client = client
        # Scripts' writes count once `replicas` replicas of each master written have them (WAIT).
        self.replicas, self.timeout_ms = replicas, timeout_ms
        self.calls: list[tuple[Any, ...]] = []
        self.replies: list[Any] = []
        self.unread = 0

    def open(self) -> None:
        """Nothing to connect ahead: the cluster client keeps a pool per node."""

    def send(self, *args: str | bytes | int | float) -> None:
        self.calls.append(args)
        self.unread += 1

    def send_all(self, calls: Sequence[Sequence[str | bytes | int | float]]) -> None:
        for call in calls:
            self.send(*call)

    def read(self, calls: int) -> list[Any]:
        assert calls <= self.unread, f"reading {calls} replies, {self.unread} unread"
        if len(self.replies) < calls:
            self._flush()
        out, self.replies = self.replies[:calls], self.replies[calls:]
        self.unread -= calls
        return out

    def _flush(self) -> None:
        pending, self.calls = self.calls, []
        try:
            pipe = self.client.pipeline(transaction=False)
            written: dict[str, Any] = {}  # node name -> node, of the masters the scripts wrote
            for call in pending:
                if call[0] == "MGET":
                    for key in call[1:]:
                        pipe.execute_command("GET", key)
                else:
                    pipe.execute_command(*call)
                    if call[0] in _WRITTEN_KEY_AT and self.replicas:
                        node = self.client.get_node_from_key(call[_WRITTEN_KEY_AT[call[0]]])  # type: ignore[attr-defined]
                        written[node.name] = node
            for node in written.values():  # last on the node's connection: waits for the writes before it
                pipe.execute_command("WAIT", self.replicas, self.timeout_ms, target_nodes=node)
            replies = pipe.execute(raise_on_error=False)
        except BaseException:
            self.reset()
            raise
        acks = replies[len(replies) - len(written) :]
        short = [node for node, n in zip(written.values(), acks, strict=True) if not isinstance(n, int) or n < self.replicas]
        if short and any(self._has_replicas(node) for node in short):
            self.reset()
            raise redis.ConnectionError(f"writes not on {self.replicas} replica(s) of each master: {acks}")
        flat = iter(replies)
        for call in pending:
            self.replies.append(_mget_reply([next(flat) for _ in call[1:]]) if call[0] == "MGET" else next(flat))

    def _has_replicas(self, node: Any) -> bool:
        """Whether a master that did not confirm the writes has a replica linked, which a failover could
        promote without them (a master without one has nothing to lose its writes to: it needs no wait)."""
        info = self.client.info("replication", target_nodes=node)  # type: ignore[call-arg]
        return int(info.get("connected_slaves", 0)) > 0

    def reset(self) -> None:
        self.calls.clear()
        self.replies.clear()
        self.unread = 0


# The writes whose masters a lane waits for, and where each names its (first) key.
_WRITTEN_KEY_AT = {"EVALSHA": 3, "SET": 1, "DEL": 1}


def lane_for(client: redis.Redis, replicas: int = 0, timeout_ms: int = 1000) -> Lane | ClusterLane:
    """The lane for `client`: one held connection, or a pipeline per read on a Redis Cluster (whose
    scripts' writes wait for `replicas` replicas there)."""
    return ClusterLane(client, replicas, timeout_ms) if is_cluster(client) else Lane(client)


def _mget_reply(parts: list[Any]) -> list[Any] | Exception:
    """An MGET sent as one GET a key (a cluster's keys live in several slots) answers as MGET would:
    the values, or the first error as the whole reply, which callers check for as for any other call."""
    return next((part for part in parts if isinstance(part, Exception)), parts)
