"""Prometheus metrics of the speed layer's processes: the consumers (`recs speed run`) and the lake writer.

Each process serves them on its own port (settings.metrics); `--consumers N` serves the N children's
sums from the supervisor (common/metrics.py). The stream's backlog gauges are refreshed by every
process for every group of the stream, so a group whose consumers are all down still shows its lag.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from prometheus_client import Counter, Gauge, Histogram

from common import redis_keys
from common.events import Event
from common.metrics import BatchHistogram
from common.stream import groups_backlog

# ---------------------------------------------------------------- the stream (every process)

GROUP_LAG = Gauge(
    "recs_stream_group_lag",
    "Entries of the event stream a consumer group has not applied yet: not yet delivered plus pending.",
    ["group"],
    multiprocess_mode="livemax",
)
GROUP_PENDING = Gauge(
    "recs_stream_group_pending",
    "Entries delivered to a consumer group and not acknowledged yet.",
    ["group"],
    multiprocess_mode="livemax",
)
DEAD_LETTERS_HELD = Gauge(
    "recs_stream_dead_letters",
    "Entries in the dead-letter stream (malformed or failing events kept for inspection).",
    multiprocess_mode="livemax",
)

# ---------------------------------------------------------------- speed consumers

EVENTS = Counter(
    "recs_speed_events",
    "Stream entries a speed consumer handled, by outcome: applied, duplicate, erased (dropped), "
    "dead_letter, retry (left pending after conflicts).",
    ["outcome"],
)
EVENT_OUTCOMES = ("applied", "duplicate", "erased", "dead_letter", "retry")
_EVENTS = {outcome: EVENTS.labels(outcome) for outcome in EVENT_OUTCOMES}  # labels() looked up once
BATCH_SECONDS = Histogram(
    "recs_speed_batch_seconds",
    "A batch's time from its read to its effects written (before the acknowledgement).",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0),
)
FRESHNESS = BatchHistogram(
    "recs_speed_freshness_seconds",
    "Per event: from its arrival (received_at) to its effects written in Redis.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
)

# ---------------------------------------------------------------- lake writer

LAKE_ROWS = Counter(
    "recs_lake_writer_rows",
    "Event rows handed to the lake: those with analytics consent and naming no erased person (the lake "
    "skips a redelivered row it holds already).",
)
LAKE_BYTES = Counter("recs_lake_writer_bytes", "Bytes of Parquet files written to the lake.")
LAKE_FILES = Counter("recs_lake_writer_files", "Parquet files written to the lake.")
LAKE_FLUSH_SECONDS = Histogram(
    "recs_lake_writer_flush_seconds",
    "A flush's time: filter, write the files, rename them into place, acknowledge.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LAKE_LAST_FLUSH = Gauge(
    "recs_lake_writer_last_flush_timestamp_seconds",
    "When the lake writer last flushed (Unix time), rows or none: it flushes at least every lake.flush_seconds.",
    multiprocess_mode="livemax",
)


def count_batch(applied: int, duplicate: int, erased: int, dead_letter: int, retry: int) -> None:
    for outcome, n in zip(EVENT_OUTCOMES, (applied, duplicate, erased, dead_letter, retry), strict=True):
        if n:
            _EVENTS[outcome].inc(n)


def observe_freshness(events: Sequence[Event], now_s: float | None = None) -> None:
    """Each event's time from arrival to now (events without received_at are left out)."""
    now_s = time.time() if now_s is None else now_s
    FRESHNESS.observe_many([now_s - e.received_at.timestamp() for e in events if e.received_at is not None])


class StreamGauges:
    """Refreshes the stream's backlog gauges (every group's lag and pending, the dead letters held) when
    `every_s` has passed: one XINFO GROUPS and one XLEN."""

    def __init__(self, client: redis.Redis, stream: str, every_s: float) -> None:
        self.client = client
        self.stream = stream
        self.every_s = every_s
        self._next = 0.0

    def refresh_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        self.refresh()

    def refresh(self) -> None:
        for group, (lag, pending) in groups_backlog(self.client, self.stream).items():
            GROUP_LAG.labels(group).set(lag + pending)
            GROUP_PENDING.labels(group).set(pending)
        DEAD_LETTERS_HELD.set(self.client.xlen(redis_keys.dead_letter(self.stream)))
