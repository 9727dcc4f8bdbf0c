"""Ordered co-visitation ("a followed by b within n steps, weighted by the gap"), the one definition.

The speed layer's event script (speed_layer/apply_events.lua, `covisit`) applies this rule in Redis; the
batch layer and ranker training apply it here, in Python, over the event log in arrival order. A
test holds the two to the same numbers.

The rule, per session: when an item enters the session's recent items for the first time, it is
paired with the session's `steps` most recent other items (most recent first, by their latest
event time). The g-th of them gets `follow_weight(g)` added to its row for the new item: the
sequential-rules weight of Ludewig and Jannach (2018), "a followed by b at gap g counts 1/g".
Items that leave the session's recent items (it keeps `recent_n`) can enter again.

In Redis the speed layer keeps a row in whole units, FOLLOW_UNIT to a weight of 1 (`follow_units`),
so that 1/g is an exact integer for every gap up to MAX_STEPS: Redis keeps a small sorted set's
scores compactly (a listpack) and parses a fractional score on every write and read, while it keeps
an integer as one (a 100-member row: ZADD 4.9 against 32 µs, ZREVRANGE of 50 WITHSCORES 18 against
32 µs, 1.1 against 3.1 kB). Readers take units / FOLLOW_UNIT (`follow_weights`): the exact sum of
the 1/g, where this counter sums them as floats, so the two agree to the last few bits, as they did
when the script summed floats in its own order. The counter keeps floats because the batch table
and the ranker's training features come from it: their values are those of earlier versions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import truediv

import numpy as np

from common.events import ATTENTION_EVENTS

# Item event types that do not put their item into the session's recent items.
SEQUENCE_EXCLUDED_TYPES = frozenset({"remove_from_cart"}) | ATTENTION_EVENTS


MAX_STEPS = 20  # the longest gap counted (speed.covis_steps' bound): 1/g is a whole number of units
FOLLOW_UNIT = math.lcm(*range(1, MAX_STEPS + 1))  # 232,792,560 units in a weight of 1, in Redis


def follow_weight(gap: int) -> float:
    """Weight of "b followed a, `gap` distinct items later" (gap >= 1)."""
    return 1.0 / gap


def follow_units(gap: int) -> int:
    """follow_weight(gap) in Redis' units (1 <= gap <= MAX_STEPS)."""
    return FOLLOW_UNIT // gap


def follow_weights(followers: Iterable[str], units: Iterable[int | float]) -> dict[str, float]:
    """A row's followers and their units as Redis holds them, as follower -> weight (at C level: serving
    reads ~10 rows of 50 a request). Whole units as int give the weight float units would, below 2^53."""
    return dict(zip(followers, map(truediv, units, repeat(FOLLOW_UNIT)), strict=True))


@dataclass
class SequenceCounter:
    """Ordered co-visits over sessions, fed event by event in arrival order (the speed layer's rule)."""

    steps: int
    recent_n: int
    top_n: int = 50  # followers kept per item where a row is read (speed.covis_top_n)
    follows: defaultdict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    _sessions: dict[str, dict[str, float]] = field(default_factory=dict)  # session -> recent item -> latest time
    _top: dict[str, dict[str, float]] = field(default_factory=dict)  # rows' tops as last read
    # A read row's followers whose weight grew since that read: with the last top, the only ones that can
    # be in its top now (weights only grow, so a follower outside it that did not grow is still beaten).
    _grown: dict[str, set[str]] = field(default_factory=dict)

    def add(self, session: str, item: str, ts_s: float) -> bool:
        """One item event of `session` at `ts_s` (epoch seconds); True when the item is new to the
        session's recent items (the moment the speed layer also indexes it for session-kNN)."""
        recent = self._sessions.setdefault(session, {})
        if item in recent:
            recent[item] = max(recent[item], ts_s)  # ZADD GT: only a later time moves it
            return False
        # Most recent first; Redis's ZREVRANGE breaks equal scores by member, descending.
        for gap, (_, other) in enumerate(newest_first(recent)[: self.steps], start=1):
            self.follows[other][item] += follow_weight(gap)
            grown = self._grown.get(other)
            if grown is not None:
                grown.add(item)
        recent[item] = ts_s
        if len(recent) > self.recent_n:  # keep the newest recent_n, as the script's trim does
            self._sessions[session] = newest(recent, self.recent_n)
        return True

    def add_all(self, events: Iterable[tuple[str, str, float]]) -> None:
        """(session, item, ts_s) triples, in arrival order."""
        for session, item, ts_s in events:
            self.add(session, item, ts_s)

    def row(self, item: str) -> Mapping[str, float]:
        """One item's whole row of followers."""
        return self.follows.get(item, {})

    def top(self) -> dict[str, Mapping[str, float]]:
        """item -> its top_n followers by weight (ties by item id), the shape serving reads."""
        return {item: self.top_row(item) for item in self.follows}

    def top_row(self, item: str) -> Mapping[str, float]:
        """One item's top_n followers (what serving reads of a co-visitation key). A row read before is
        ranked again over its last top and the followers that grew since, not over all its followers."""
        row: Mapping[str, float] = self.follows.get(item, {})
        top = self._top.get(item)
        if top is None:
            top = heaviest(row, self.top_n)
        elif grown := self._grown[item]:  # kept beside every top
            top = heaviest({follower: row[follower] for follower in (*top, *grown)}, self.top_n)
        else:
            return top
        self._top[item], self._grown[item] = top, set()
        return top


def newest_first(times: Mapping[str, float]) -> list[tuple[float, str]]:
    """(time, member) pairs, latest first, equal times by member descending (Redis's ZREVRANGE order);
    tuples compared at C level, where a key function would be called once per member."""
    return sorted(zip(times.values(), times.keys(), strict=True), reverse=True)


def newest(times: Mapping[str, float], n: int) -> dict[str, float]:
    """The n latest members, latest first, in newest_first's order (a Redis trim to the newest n)."""
    return {member: at for at, member in newest_first(times)[:n]}


def heaviest(row: Mapping[str, float], n: int, ties_descending: bool = False) -> dict[str, float]:
    """The n heaviest members, heaviest first, equal weights by member ascending (descending: Redis's
    ZREVRANGE): the first n of the whole row so ordered, found without ordering the whole row (a popular
    item's co-visits hold thousands)."""
    if len(row) > 4 * n:
        weights = np.fromiter(row.values(), np.float64, len(row))
        nth = np.partition(weights, len(weights) - n)[len(weights) - n]
        # At least n weigh nth or more, so the first n of them are the first n of the whole row.
        members = list(row)
        row = {members[i]: row[members[i]] for i in np.flatnonzero(weights >= nth).tolist()}
    if ties_descending:
        return {member: weight for weight, member in sorted(zip(row.values(), row.keys(), strict=True), reverse=True)[:n]}
    return dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:n])
