"""The lambda-merge switch: rebuild a new model version's deltas from the events at or after its cutoff.

Protocol (exactly once per version, see DESIGN.md "The lambda merge"):
1. one consumer takes the version's rebuild lock and sets SPEED_PENDING_VERSION;
2. from then on every consumer batch (its XREADGROUP happens before it reads the pending
   version) also writes the new version's deltas;
3. the replay reads every event with received_at >= cutoff up to the stream's end as seen
   after step 1 (from the stream, and from the lake where the stream was trimmed);
4. both paths go through the same script, whose per-version dedup field lets an event into a
   version's delta once; then SPEED_VERSION is switched. Old version keys expire by TTL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import cast

import redis

from common import redis_keys
from common.events import Event, table_to_events
from common.lake import Lake
from common.model import ModelArtifacts
from common.settings import Settings
from common.stream import Entries, decode_entry
from speed_layer.effects import Applier

log = logging.getLogger(__name__)

STREAM_SLACK_MS = 5 * 60_000  # entry ids follow received_at closely; start a little earlier
REPLAY_CHUNK = 1000
LOCK_TTL_S = 3600


def entry_time(entry_id: bytes | str) -> datetime:
    """The arrival time a stream entry id encodes (milliseconds since the epoch)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return datetime.fromtimestamp(int(text.split("-", 1)[0]) / 1000, tz=UTC)


def stamped(event: Event, entry_id: bytes | str) -> Event:
    """The event with received_at, taken from the entry id when the producer did not set it."""
    return event if event.received_at is not None else event.received(entry_time(entry_id))


def switch_version(
    client: redis.Redis, settings: Settings, lake: Lake, applier: Applier, model: ModelArtifacts
) -> bool:
    """Rebuild `model`'s deltas and make it the speed layer's version; False if another consumer does it."""
    version = model.version
    current = cast(bytes | None, client.get(redis_keys.SPEED_VERSION))
    if current is not None and current.decode() == version:
        return False
    if not client.set(redis_keys.speed_rebuild_lock(version), "1", nx=True, ex=LOCK_TTL_S):
        return False
    try:
        client.set(redis_keys.SPEED_PENDING_VERSION, version)
        end_id = _stream_end(client, settings)
        started = time.monotonic()
        replayed = applied = 0
        for chunk in _chunks(replay_events(client, settings, lake, model.manifest.cutoff, end_id)):
            result = applier.apply(chunk, [model], base=False)
            replayed += len(chunk)
            applied += result.applied
            if result.unresolved:
                raise RuntimeError(f"replay for {version}: {len(result.unresolved)} events kept conflicting")
        pipe = client.pipeline(transaction=True)
        pipe.set(redis_keys.speed_rebuild_marker(version), datetime.now(UTC).isoformat())
        pipe.set(redis_keys.SPEED_VERSION, version)
        pipe.delete(redis_keys.SPEED_PENDING_VERSION)
        pipe.execute()
        log.info(
            "speed layer now serves %s: replayed %d events after %s (%d newly applied) in %.1fs",
            version, replayed, model.manifest.cutoff.isoformat(), applied, time.monotonic() - started,
        )  # fmt: skip
        return True
    finally:
        client.delete(redis_keys.speed_rebuild_lock(version))


def replay_events(
    client: redis.Redis, settings: Settings, lake: Lake, cutoff: datetime, end_id: str | None
) -> Iterator[Event]:
    """Events with received_at >= cutoff up to the stream entry `end_id`, oldest first, each once."""
    from_stream = list(_stream_events(client, settings, cutoff, end_id))
    oldest_entry = _stream_start(client, settings)
    covered = oldest_entry is not None and entry_time(oldest_entry).timestamp() * 1000 <= (
        cutoff.timestamp() * 1000 - STREAM_SLACK_MS
    )
    events: dict[str, Event] = {}
    if not covered:  # the stream was trimmed past the cutoff (or is empty): the lake has the older part
        for event in table_to_events(lake.read_events(start=cutoff)):
            events[event.event_id] = event
    for event in from_stream:
        events.setdefault(event.event_id, event)
    yield from sorted(events.values(), key=lambda e: (e.received_at or cutoff, e.event_id))


def _stream_events(
    client: redis.Redis, settings: Settings, cutoff: datetime, end_id: str | None
) -> Iterator[Event]:
    if end_id is None:
        return
    key = redis_keys.stream(settings.redis.stream)
    start = f"{max(0, int(cutoff.timestamp() * 1000) - STREAM_SLACK_MS)}-0"
    while True:
        entries = cast(Entries, client.xrange(key, min=start, max=end_id, count=REPLAY_CHUNK))
        for entry_id, fields in entries:
            try:
                event = stamped(decode_entry(fields), entry_id)
            except ValueError:
                continue  # the live consumers dead-letter it
            if event.received_at is not None and event.received_at >= cutoff:
                yield event
        if len(entries) < REPLAY_CHUNK:
            return
        start = "(" + entries[-1][0].decode()


def _stream_end(client: redis.Redis, settings: Settings) -> str | None:
    last = cast(Entries, client.xrevrange(redis_keys.stream(settings.redis.stream), count=1))
    return last[0][0].decode() if last else None


def _stream_start(client: redis.Redis, settings: Settings) -> bytes | None:
    first = cast(Entries, client.xrange(redis_keys.stream(settings.redis.stream), count=1))
    return first[0][0] if first else None


def _chunks(events: Iterator[Event]) -> Iterator[list[Event]]:
    chunk: list[Event] = []
    for event in events:
        chunk.append(event)
        if len(chunk) >= REPLAY_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
