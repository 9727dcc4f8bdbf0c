"""Live lists for open streams (SSE, WebSocket): one Redis subscription per worker, fanned out by person and session.

The speed layer publishes a RecsChangedBatch on RECS_CHANNEL from each script call that applies events
(a batch of up to speed.script_chunk events is one call), naming every person it changed. A worker
subscribes once; each message is parsed once and its changes looked up in an index from person and
session to the open streams they concern, which are marked for a new list.
Marks coalesce: a stream marked again before its list is computed still gets one list, computed
after the last mark (the latest state), and streams of the same request (a person's tabs) share
one computation. One lane per worker has the marked lists computed one at a time, by the worker's
push helper (serving/core/push_helper.py), a process of lower priority, so the worker answers
requests meanwhile. Where no helper is up the worker computes them itself, in its idle moments:
a push has a second of slack, a request none, so a list waits for the requests in flight to be
answered, up to PUSH_DEFER_S after it was marked. Each stream has a slot: a queue
of one, where a newer list replaces one the client has not taken yet, so a slow client holds at
most the latest list (each replaced one counts in recs_push_dropped_total); a list equal to the
last one the stream sent is not sent again (recs_push_unchanged_total).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from common import redis_keys
from common.messages import RecsChanged, RecsChangedBatch
from common.redis_server import pubsub_url
from serving.core import metrics
from serving.core.errors import ErrorBody
from serving.core.push_helper import PushHelper

log = logging.getLogger(__name__)

RETRY_S = 1.0  # between attempts to subscribe again after Redis was lost
# Generous: a loaded worker's loop may lag past a short timeout, and a false "lost" ends every stream.
CONNECT_TIMEOUT_S = 5.0
# Before each list: a timer lets the loop read the requests that arrived meanwhile, and the sleep(0)
# after it lets their tasks start (they were scheduled before it), and so count as in flight.
YIELD_S = 0.001
# How long a marked list waits for the worker to have no request in flight; past it, it is
# computed anyway (a busy worker would starve pushes). Well inside a push's second of slack.
PUSH_DEFER_S = 0.3

Key = tuple[str, str]  # ("person", id) or ("session", id): a person and a session may share an id


@dataclass
class PushedList:
    """A computed list: its body, what a client sees of it (two lists with equal `content` are the same
    list to the client), and what to do once it is sent (log its impression), done once however many
    streams share it."""

    body: str
    content: object
    on_sent: Callable[[], None] = lambda: None
    sent: bool = False

    def mark_sent(self) -> None:
        if not self.sent:
            self.sent = True
            self.on_sent()


Compute = Callable[[], Awaitable[PushedList]]

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


_NOTHING_SENT = object()  # the content of the list before a stream's first


class LiveStream:
    """One open stream: the keys it listens to, its request (streams of equal requests share a computation),
    how its list is computed, and a slot of one list."""

    def __init__(self, keys: frozenset[Key], compute: Compute, transport: str, request: Hashable = None) -> None:
        self.keys = keys
        self.compute = compute
        self.transport = transport
        # None: a request of its own. Two streams with the same non-None request must get the same list.
        self.request: Hashable = request if request is not None else object()
        self.queued = False  # marked for a new list that is not computed yet
        self.closed = False
        self._list: PushedList | None = None
        self._last_content: object = _NOTHING_SENT
        self._ended: ErrorBody | None = None
        self._ready = asyncio.Event()

    def offer(self, pushed: PushedList) -> bool:
        """Put a list in the slot, replacing one the client has not taken (a drop); False, and nothing put,
        when the client would see nothing new: it equals the list in the slot or, the slot empty, the
        last one taken."""
        latest = self._list.content if self._list is not None else self._last_content
        if pushed.content == latest:
            metrics.PUSH_UNCHANGED.labels(self.transport).inc()
            return False
        if self._list is not None:
            metrics.PUSH_DROPPED.labels(self.transport).inc()
        self._list = pushed
        self._ready.set()
        return True

    def end(self, error: ErrorBody) -> None:
        self._ended = error
        self._ready.set()

    async def next(self) -> PushedList:
        """The latest list not taken yet, waiting for one; StreamEnded once the stream can get no more."""
        await self._ready.wait()
        if self._ended is not None:
            raise StreamEnded(self._ended)
        self._ready.clear()
        pushed, self._list = self._list, None
        assert pushed is not None
        self._last_content = pushed.content
        return pushed


class InFlight:
    """The worker's HTTP requests not answered yet (a stream counts until its response starts): pushes
    wait for none to be in flight."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def idle(self, timeout: float) -> None:
        """Return once no request is in flight, or after `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)


@dataclass
class _Job:
    """The streams of one request marked for a list, and when the first was marked."""

    marked_at: float
    streams: list[LiveStream] = field(default_factory=list)


class Fanout:
    """A worker's streams, indexed by key; its Redis subscription and the task that computes lists.

    Both tasks start with the first stream and run until `aclose`."""

    def __init__(self, redis_url: str, helper: PushHelper | None = None) -> None:
        self.redis_url = redis_url
        self.helper = helper  # the worker's push helper, which LiveStream.compute asks; None: lists computed here
        self.requests = InFlight()  # counted by the app's middleware
        self._index: dict[Key, set[LiveStream]] = {}
        self._streams: set[LiveStream] = set()
        self._jobs: dict[Hashable, _Job] = {}  # by request, in the order first marked
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
        if self.helper is not None:  # after the tasks: a list asked of it would be computed here instead
            await self.helper.aclose()

    def dispatch(self, data: bytes | str) -> int:
        """Mark the streams a RecsChangedBatch concerns (parsed once for all of them); returns how many."""
        try:
            batch = RecsChangedBatch.model_validate_json(data)
        except ValueError:
            log.warning("ignoring a malformed message on %s", redis_keys.RECS_CHANNEL)
            return 0
        concerned: set[LiveStream] = set()
        for change in batch.changes:
            for key in message_keys(change):
                concerned.update(self._index.get(key, ()))
        for stream in concerned:
            self._mark(stream)
        return len(concerned)

    def _mark(self, stream: LiveStream) -> None:
        if stream.queued:  # marked again before its list is computed: that list, computed later, serves both
            metrics.PUSH_COALESCED.inc()
            return
        stream.queued = True
        job = self._jobs.get(stream.request)
        if job is None:
            self._jobs[stream.request] = _Job(time.monotonic(), [stream])
            self._wake.set()
        else:  # another stream of the same request is waiting: one computation for both
            job.streams.append(stream)
            metrics.PUSH_COALESCED.inc()

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
        """Have the marked lists computed, one at a time, oldest mark first; in this worker, each when no
        request is in flight."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._jobs:
                # No list before the subscription: a change published in between would be missed.
                await self._subscribed.wait()
                request, job = next(iter(self._jobs.items()))
                if self.helper is None or not self.helper.offloads:  # computed here: it would hold up requests
                    await self._after_requests(job.marked_at)
                # Taken off only now: marks that came while it waited are served by this computation.
                del self._jobs[request]
                streams = [stream for stream in job.streams if not stream.closed]
                for stream in job.streams:
                    stream.queued = False
                if streams:
                    await self._compute(streams)

    async def _after_requests(self, marked_at: float) -> None:
        """Let the requests that arrived start, then wait until none is in flight, up to PUSH_DEFER_S after
        the mark."""
        deadline = marked_at + PUSH_DEFER_S
        while True:
            await asyncio.sleep(YIELD_S)
            await asyncio.sleep(0)
            left = deadline - time.monotonic()
            if not self.requests.count or left <= 0:
                return
            await self.requests.idle(left)

    async def _compute(self, streams: list[LiveStream]) -> None:
        """One list for streams of the same request, offered to each still open."""
        try:
            pushed = await streams[0].compute()
        except Exception:
            log.exception("computing a pushed list failed")
            for stream in streams:
                stream.end(COMPUTE_FAILED)
                self.close(stream)
            return
        metrics.PUSH_COMPUTED.inc()
        for stream in streams:
            if not stream.closed and stream.offer(pushed):
                metrics.PUSHED.labels(stream.transport).inc()
