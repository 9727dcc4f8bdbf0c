"""Live lists for open streams (SSE, WebSocket): one Redis subscription per worker, fanned out by person and session.

The speed layer publishes a RecsChanged on RECS_CHANNEL for each person a batch changed. A
worker subscribes once; each message is parsed once and looked up in an index from person and
session to the open streams it concerns, which are marked for a new list. One task per worker
computes the marked streams' lists, one at a time and after the requests already waiting, into
each stream's slot: a queue of one, where a newer list replaces one the client has not taken yet,
so a slow client holds at most the latest list (each replaced one counts in recs_push_dropped_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import redis.asyncio as aioredis

from common import redis_keys
from common.messages import RecsChanged
from common.redis_server import pubsub_url
from serving.core import metrics
from serving.core.errors import ErrorBody

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between attempts to subscribe again after Redis was lost
# Generous: a loaded worker's loop may lag past a short timeout, and a false "lost" ends every stream.
CONNECT_TIMEOUT_S = 5.0
# Before each list: a push has a second of slack, a request none. A timer (not sleep(0), which
# resumes before the tasks of requests that arrived meanwhile) lets those requests run first.
YIELD_S = 0.001

Key = tuple[str, str]  # ("person", id) or ("session", id): a person and a session may share an id
Compute = Callable[[], Awaitable[str]]

REDIS_LOST = ErrorBody(error="redis_unavailable", message="Redis is unreachable; reconnect later")
COMPUTE_FAILED = ErrorBody(error="internal_error", message="the list could not be computed; reconnect later")


class StreamEnded(Exception):
    """The stream can get no more lists (Redis lost, or its list failed); `error` says why."""

    def __init__(self, error: ErrorBody) -> None:
        super().__init__(error.message)
        self.error = error


def stream_keys(people: Iterable[str], session_id: str | None) -> frozenset[Key]:
    """The index keys of a stream: a message concerns it if its person or its session is one of them."""
    keys = {("person", person) for person in people}
    if session_id is not None:
        keys.add(("session", session_id))
    return frozenset(keys)


def message_keys(message: RecsChanged) -> list[Key]:
    keys = [("person", message.person_id)]
    if message.session_id is not None:
        keys.append(("session", message.session_id))
    return keys


class LiveStream:
    """One open stream: the keys it listens to, how its list is computed, and a slot of one list."""

    def __init__(self, keys: frozenset[Key], compute: Compute, transport: str) -> None:
        self.keys = keys
        self.compute = compute
        self.transport = transport
        self.queued = False  # marked for a new list that is not computed yet
        self.closed = False
        self._list: str | None = None
        self._ended: ErrorBody | None = None
        self._ready = asyncio.Event()

    def offer(self, body: str) -> None:
        """Put a list in the slot, replacing one the client has not taken (a drop)."""
        if self._list is not None:
            metrics.PUSH_DROPPED.labels(self.transport).inc()
        self._list = body
        self._ready.set()

    def end(self, error: ErrorBody) -> None:
        self._ended = error
        self._ready.set()

    async def next(self) -> str:
        """The latest list not taken yet, waiting for one; StreamEnded once the stream can get no more."""
        await self._ready.wait()
        if self._ended is not None:
            raise StreamEnded(self._ended)
        self._ready.clear()
        body, self._list = self._list, None
        assert body is not None
        return body


class Fanout:
    """A worker's streams, indexed by key; its Redis subscription and the task that computes lists.

    Both tasks start with the first stream and run until `aclose`."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._index: dict[Key, set[LiveStream]] = {}
        self._streams: set[LiveStream] = set()
        self._marked: deque[LiveStream] = deque()
        self._wake = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def open(self, stream: LiveStream) -> None:
        """Index the stream and mark it for its first list."""
        self._streams.add(stream)
        for key in stream.keys:
            self._index.setdefault(key, set()).add(stream)
        metrics.PUSH_STREAMS.labels(stream.transport).inc()
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="push-listener"),
                asyncio.create_task(self._push(), name="push-lists"),
            ]
        self._mark(stream)

    def close(self, stream: LiveStream) -> None:
        stream.closed = True
        if stream not in self._streams:  # closed already, or never opened
            return
        self._streams.remove(stream)
        for key in stream.keys:
            subscribers = self._index.get(key)
            if subscribers is not None:
                subscribers.discard(stream)
                if not subscribers:
                    del self._index[key]
        metrics.PUSH_STREAMS.labels(stream.transport).dec()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def dispatch(self, data: bytes | str) -> int:
        """Mark the streams a RecsChanged concerns (parsed once for all of them); returns how many."""
        try:
            message = RecsChanged.model_validate_json(data)
        except ValueError:
            log.warning("ignoring a malformed message on %s", redis_keys.RECS_CHANNEL)
            return 0
        concerned: set[LiveStream] = set()
        for key in message_keys(message):
            concerned.update(self._index.get(key, ()))
        for stream in concerned:
            self._mark(stream)
        return len(concerned)

    def _mark(self, stream: LiveStream) -> None:
        if not stream.queued:  # a stream marked twice before its list is computed gets one list
            stream.queued = True
            self._marked.append(stream)
            self._wake.set()

    def _end_all(self, error: ErrorBody) -> None:
        for stream in list(self._streams):
            stream.end(error)
            self.close(stream)

    async def _listen(self) -> None:
        """Keep one subscription; when Redis is lost, end every open stream (clients reconnect) and retry."""
        while True:
            client = aioredis.Redis.from_url(pubsub_url(self.redis_url), socket_connect_timeout=CONNECT_TIMEOUT_S)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(redis_keys.RECS_CHANNEL)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        self.dispatch(message["data"])
            except (aioredis.RedisError, OSError) as exc:
                self._subscribed.clear()
                if self._streams:
                    log.warning("live recommendation streams end, Redis lost: %s", exc)
                self._end_all(REDIS_LOST)
            finally:
                with contextlib.suppress(Exception):  # the connection may already be gone
                    await pubsub.aclose()
                    await client.aclose()
            await asyncio.sleep(RETRY_S)

    async def _push(self) -> None:
        """Compute the marked streams' lists, one at a time, each after the requests already waiting."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._marked:
                # No list before the subscription: a change published in between would be missed.
                await self._subscribed.wait()
                await asyncio.sleep(YIELD_S)
                stream = self._marked.popleft()
                stream.queued = False
                if stream.closed:
                    continue
                try:
                    body = await stream.compute()
                except Exception:
                    log.exception("computing a pushed list failed")
                    stream.end(COMPUTE_FAILED)
                    self.close(stream)
                    continue
                if not stream.closed:
                    metrics.PUSHED.labels(stream.transport).inc()
                    stream.offer(body)
