"""The lake writer: a second consumer group that lands every stream event in the Parquet lake, but
those naming an erased person (redis_keys.erased) and those without analytics consent (events.Consent,
capped by the withdrawals recorded after them): the speed layer counted those in its aggregates, and
no row of theirs, with or without ids, reaches the lake, so the warehouse's KPIs are those of the
visitors who consented, each session whole.

Entries are acknowledged only after their file is renamed into place, and Lake.write drops rows
whose event_id the files written since the buffer's oldest entry (less lake.dedup_window_s) hold, so
a `kill -9` at any moment loses nothing acknowledged and, on restart, duplicates nothing; each flush
reads the ids of those files, not the whole day's.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import cast

import redis

from common import consent, redis_keys
from common.events import Consent, Event, events_to_table
from common.lake import EVENTS_DATASET, Lake
from common.settings import Settings
from common.stream import decode_entry, remove_idle_consumers
from speed_layer import metrics
from speed_layer.consumer import Entry, consumer_name, ensure_group, poll_until_stopped
from speed_layer.switch import stamped

log = logging.getLogger(__name__)
# A flush writes one file in seconds; a temp file this old was left by a writer killed mid-flush.
STALE_TEMP_FILE_S = 3600


class LakeWriter:
    def __init__(
        self, client: redis.Redis, settings: Settings, lake: Lake | None = None, name: str | None = None
    ):
        self.client = client
        self.settings = settings
        self.lake = lake or Lake(settings.lake.root)
        self.group = settings.speed.lake_group
        self.name = name or consumer_name()
        self.stream_key = redis_keys.stream(settings.redis.stream)
        self.buffer: list[tuple[bytes, Event | None]] = []  # None: malformed, acked without a row
        self.buffer_since = time.monotonic()
        self._next_claim = 0.0
        self._own_pending_done = False
        self.stream_gauges = metrics.StreamGauges(client, settings.redis.stream, settings.metrics.stream_refresh_s)
        ensure_group(client, self.stream_key, self.group)

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("lake writer %s: %s -> %s", self.name, self.stream_key, self.lake.root_url)
        self.remove_stale_temp_files()
        poll_until_stopped(self.poll_once, stop)
        self.flush()

    def remove_stale_temp_files(self) -> int:
        """Remove what writers killed mid-flush left: temp files older than a flush could take."""
        older_than = datetime.now(UTC) - timedelta(seconds=STALE_TEMP_FILE_S)
        removed = self.lake.remove_stale_temp_files(EVENTS_DATASET, older_than)
        if removed:
            log.info("removed %d temp files left by killed writers", removed)
        return removed

    def poll_once(self) -> int:
        """Read one batch into the buffer; flush when it is big or old enough. Returns entries read."""
        lake = self.settings.lake
        self.stream_gauges.refresh_if_due()
        room = max(1, lake.flush_events - len(self.buffer))
        wait_ms = max(1, int((self.buffer_since + lake.flush_seconds - time.monotonic()) * 1000))
        entries = self._read(room, wait_ms if self.buffer else int(lake.flush_seconds * 1000))
        held = {entry_id for entry_id, _ in self.buffer}
        entries = [
            (i, f) for i, f in entries if i not in held
        ]  # a claim may hand back our own buffered entries
        for entry_id, fields in entries:
            try:
                self.buffer.append((entry_id, stamped(decode_entry(fields), entry_id)))
            except ValueError:
                self.buffer.append((entry_id, None))  # the speed group dead-letters it with the reason
        if (
            len(self.buffer) >= lake.flush_events
            or time.monotonic() - self.buffer_since >= lake.flush_seconds
        ):
            self.flush()
        return len(entries)

    def flush(self) -> int:
        """Write the buffer as Parquet (atomic rename), then ack it. Returns the rows written."""
        if not self.buffer:
            self.buffer_since = time.monotonic()
            metrics.LAKE_LAST_FLUSH.set(time.time())  # nothing to write is not a stall
            return 0
        started = time.perf_counter()
        events = self._landing([e for _, e in self.buffer if e is not None])
        written = self.lake.write_events(events_to_table(events), self._written_since()) if events else []
        self.client.xack(self.stream_key, self.group, *[entry_id for entry_id, _ in self.buffer])
        log.debug("flushed %d events into %d files", len(events), len(written))
        self.buffer = []
        self.buffer_since = time.monotonic()
        self._observe_flush(started, len(events), written)
        return len(events)

    def _observe_flush(self, started: float, rows: int, files: list[str]) -> None:
        metrics.LAKE_FLUSH_SECONDS.observe(time.perf_counter() - started)
        metrics.LAKE_LAST_FLUSH.set(time.time())
        metrics.LAKE_ROWS.inc(rows)
        metrics.LAKE_FILES.inc(len(files))
        metrics.LAKE_BYTES.inc(sum(self.lake.fs.size(path) for path in files))

    def _written_since(self) -> datetime:
        """No earlier copy of the buffer's events can be in the lake before this: a redelivered entry was
        first written after its entry was added (entry ids are Redis' clock in ms), and a client's retry
        comes within lake.dedup_window_s of the first copy (the window also covers clock skew)."""
        oldest_ms = min(int(entry_id.split(b"-")[0]) for entry_id, _ in self.buffer)
        return datetime.fromtimestamp(oldest_ms / 1000 - self.settings.lake.dedup_window_s, UTC)

    def _landing(self, events: list[Event]) -> list[Event]:
        """The events that name no erased person or device and have analytics consent; the others stay
        out of the lake (acknowledged all the same), as an erased person's stay out of the speed layer."""
        ids = {i for e in events for i in e.person_ids}
        erased = redis_keys.erased_among(self.client, ids)
        withdrawals = consent.read_withdrawals(self.client, ids)
        return [
            e
            for e in events
            if erased.isdisjoint(e.person_ids) and consent.applied_consent(e, withdrawals).allows(Consent.ANALYTICS)
        ]

    def _read(self, count: int, block_ms: int) -> list[Entry]:
        if not self._own_pending_done:  # restarted under the same name: our unacked entries first
            entries = self._xreadgroup("0", count, None)
            if entries:
                return entries
            self._own_pending_done = True
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.settings.speed.claim_interval_s
            reply = self.client.xautoclaim(
                self.stream_key, self.group, self.name,
                min_idle_time=self.settings.speed.claim_idle_ms, start_id="0-0", count=count,
            )  # fmt: skip
            claimed = [(i, f) for i, f in reply[1] if f is not None]
            self._remove_dead_members()
            if claimed:
                return claimed
        return self._xreadgroup(">", count, block_ms)

    def _remove_dead_members(self) -> None:
        """Members idle past dead_consumer_idle_ms with nothing pending (dead writers whose entries were
        claimed) leave the group."""
        speed = self.settings.speed
        removed = remove_idle_consumers(
            self.client, self.stream_key, self.group, speed.dead_consumer_idle_ms, self.name
        )
        if removed:
            log.info("removed dead lake writers from the group: %s", ", ".join(removed))

    def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        reply = cast(
            list[tuple[bytes, list[Entry]]],
            self.client.xreadgroup(self.group, self.name, {self.stream_key: start}, count=count, block=block_ms),
        )
        if not reply:
            return []
        return [(i, f) for i, f in reply[0][1] if f is not None]
