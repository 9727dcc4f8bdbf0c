"""Per-day popularity counts of candidates: past days from a per-worker copy, today read live or from
a copy seconds old on a busy worker.

Past days change only by late events, so each worker keeps a whole copy of each past day's sorted
set, refreshed in the background every `past_ttl_s` and laid out as one matrix with a row per item;
a request then costs one ZMSCORE (today) and one lookup per item. A past day not loaded yet (a
worker's first moments, a new day) is read live for the request's candidates instead.

Today changes with every event, but a count a second old ranks the same: while a worker's requests
ask for more of today's counts than today's set holds, re-reading the whole set every
`today_refresh_s` costs less than their round trips (each ~0.3 ms of a worker's CPU with its
ZMSCORE), so the requests read a copy instead. When traffic drops below that, the copy ages out and
requests read live again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import cast

import numpy as np
import redis

from common import redis_keys
from common.features import POP_DAYS, day_index
from common.redis_server import lean_pipeline


def _past_days(now_s: float) -> list[int]:
    today = day_index(now_s)
    return [today - POP_DAYS + 1 + j for j in range(POP_DAYS - 1)]


TODAY_SCAN_COUNT = 5_000  # members a page of the copy's ZSCAN asks for: requests run between pages


class DayCounts:
    def __init__(
        self, past_ttl_s: float = 300.0, today_refresh_s: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # today_refresh_s 0: today always read live (a replay, whose clock is not the wall's).
        self.past_ttl_s = past_ttl_s
        self.today_refresh_s = today_refresh_s
        self._clock = clock
        self._past: dict[int, dict[str, float]] = {}  # day -> item -> count (whole days)
        self._loaded_at: dict[int, float] = {}
        self._window: _PastWindow | None = None  # the loaded days as one matrix, when all are loaded
        self._today: _TodayCopy | None = None
        self._asked = 0  # today's counts asked for since the last refresh_today (threads may race: an estimate)
        self._lock = threading.Lock()

    def read(self, client: redis.Redis, item_ids: Sequence[str], now_s: float) -> np.ndarray:
        """len(item_ids) x POP_DAYS counts, oldest day first, today last (as features expects)."""
        counts = np.zeros((len(item_ids), POP_DAYS), dtype=np.float64)
        if not item_ids:
            return counts
        items = list(item_ids)
        self._asked += len(items)
        today, past_days = day_index(now_s), _past_days(now_s)
        copy = self._today_copy(today)
        with self._lock:
            loaded = [self._past.get(day) for day in past_days]
            window = self._window
        live = ([] if copy else [today]) + [day for day, c in zip(past_days, loaded, strict=True) if c is None]
        by_day = _scores_by_day(client, live, items) if live else {}
        counts[:, -1] = copy.of(items) if copy else _zero_absent(by_day[today])
        if window is not None and window.days == past_days:
            # One lookup per item for every past day (not one per item and day).
            absent = len(window.rows) - 1
            rows = np.fromiter(map(window.index.get, items, repeat(absent)), np.intp, len(items))
            counts[:, :-1] = window.rows[rows]
            return counts
        for j, (day, cached) in enumerate(zip(past_days, loaded, strict=True)):
            if cached is not None:
                counts[:, j] = [cached.get(item, 0.0) for item in items]
            else:
                counts[:, j] = _zero_absent(by_day[day])
        return counts

    def refresh(self, client: redis.Redis, now_s: float | None = None) -> int:
        """Load each past day of the window not loaded within past_ttl_s; returns how many were loaded."""
        now_s = time.time() if now_s is None else now_s
        wanted = _past_days(now_s)
        loaded = 0
        for day in wanted:
            if time.monotonic() - self._loaded_at.get(day, -np.inf) < self.past_ttl_s:
                continue
            values = _scan_counts(client, redis_keys.popularity_day(day))
            with self._lock:
                self._past[day] = values
                self._loaded_at[day] = time.monotonic()
            loaded += 1
        with self._lock:
            for day in [d for d in self._past if d not in wanted]:
                del self._past[day]
                self._loaded_at.pop(day, None)
            if all(day in self._past for day in wanted) and (
                loaded or self._window is None or self._window.days != wanted
            ):
                self._window = _PastWindow.of(wanted, [self._past[day] for day in wanted])
        return loaded

    def refresh_today(self, client: redis.Redis, now_s: float | None = None) -> bool:
        """Re-read the copy of today's counts when the requests since the last call asked for at least as
        many counts as today holds; else leave the copy to age out. Returns whether it was re-read."""
        now_s = time.time() if now_s is None else now_s
        asked, self._asked = self._asked, 0
        key = redis_keys.popularity_day(day_index(now_s))
        if self.today_refresh_s <= 0 or asked == 0 or asked < cast(int, client.zcard(key)):
            return False
        loaded_at = self._clock()  # taken before the read: the copy is at least this old
        self._today = _TodayCopy(day_index(now_s), _scan_counts(client, key), loaded_at)
        return True

    def _today_copy(self, today: int) -> _TodayCopy | None:
        """The copy of today's counts while it is today's and at most two refresh periods old (one
        refresh may run late), else None: read live."""
        copy = self._today
        if copy is None or copy.day != today or self._clock() - copy.loaded_at > 2 * self.today_refresh_s:
            return None
        return copy


def _scores_by_day(client: redis.Redis, days: list[int], items: list[str]) -> dict[int, list[float | None]]:
    """day -> ZMSCORE of `items` in its sorted set, in one round trip (one day, with the past days
    loaded, on the usual request)."""
    commands = [("ZMSCORE", redis_keys.popularity_day(day), *items) for day in days]
    return dict(zip(days, lean_pipeline(client, commands), strict=True))


def _scan_counts(client: redis.Redis, key: str) -> dict[str, float]:
    """A day's counts (its sorted set's members and scores) by ZSCAN pages, so the worker's requests run
    between pages (one ZRANGE of a whole day would hold the interpreter while its reply is parsed). ZSCAN,
    unlike ranges by rank, returns each member present throughout at least once while counts change."""
    counts: dict[str, float] = {}
    cursor = 0
    while True:
        cursor, pairs = cast(
            tuple[int, list[tuple[bytes, float]]], client.zscan(key, cursor, count=TODAY_SCAN_COUNT)
        )
        counts.update((m.decode() if isinstance(m, bytes) else str(m), float(c)) for m, c in pairs)
        if cursor == 0:
            return counts


def _zero_absent(scores: list[float | None]) -> np.ndarray:
    """ZMSCORE's reply as counts: None (a member not in the set) is 0 (no count is NaN)."""
    counts = np.array(scores, dtype=np.float64)
    counts[np.isnan(counts)] = 0.0
    return counts


@dataclass(frozen=True)
class _TodayCopy:
    day: int
    counts: dict[str, float]  # item -> today's count
    loaded_at: float  # DayCounts' clock when its read began

    def of(self, items: list[str]) -> np.ndarray:
        return np.fromiter(map(self.counts.get, items, repeat(0.0)), np.float64, len(items))


@dataclass(frozen=True)
class _PastWindow:
    """Every loaded past day of one window as a matrix: item -> row of counts, oldest day first; the
    last row is zeros, for items that no past day counted."""

    days: list[int]
    index: dict[str, int]
    rows: np.ndarray

    @classmethod
    def of(cls, days: list[int], per_day: list[dict[str, float]]) -> _PastWindow:
        index: dict[str, int] = {}
        for counts in per_day:
            for item in counts:
                index.setdefault(item, len(index))
        rows = np.zeros((len(index) + 1, len(days)), dtype=np.float64)
        for j, counts in enumerate(per_day):
            rows[[index[item] for item in counts], j] = list(counts.values())
        return cls(days, index, rows)
