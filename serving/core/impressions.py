"""Impression logging: served lists are buffered in memory and written to the lake by a background thread.

Requests only append to a list under a lock; the flusher writes every `flush_seconds` or
when `flush_rows` are waiting, and `close()` writes what is left (called at shutdown).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

from common.lake import IMPRESSION_SCHEMA, Lake
from serving.core import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Impression:
    request_id: str
    served_at: datetime
    person_id: str
    user_id: str | None
    anonymous_id: str | None
    session_id: str | None
    context: str
    variant: str
    model_version: str | None
    degraded: str | None
    items: list[str]
    scores: list[float]
    sources: list[str]


class ImpressionLogger:
    def __init__(self, lake: Lake, flush_seconds: float = 1.0, flush_rows: int = 2000) -> None:
        self.lake = lake
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self._rows: list[Impression] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions-flusher", daemon=True)
        self._thread.start()

    def log(self, impression: Impression) -> None:
        with self._lock:
            self._rows.append(impression)
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def flush(self) -> int:
        """Write everything buffered now; returns the rows handed to the lake."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            self.lake.write_impressions(_to_table(rows))
        except Exception:  # a full disk must not take the API down; count and log it
            log.exception("could not write %d impressions to the lake", len(rows))
            metrics.IMPRESSIONS_DROPPED.inc(len(rows))
            return 0
        return len(rows)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()


def _to_table(rows: list[Impression]) -> pa.Table:
    columns = {name: [getattr(r, name) for r in rows] for name in IMPRESSION_SCHEMA.names}
    return pa.table(columns, schema=IMPRESSION_SCHEMA)
