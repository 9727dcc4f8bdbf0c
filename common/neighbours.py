"""Session neighbours (session-kNN, V-SKNN style): the one definition of the index and the scoring.

The speed layer keeps the index in Redis (speed_layer/apply_events.lua, `index_neighbour`): when an item
enters a session's recent items, the session (by `session_token`) records the item, and
the item records the session, each with the time. Serving scores it inside its one read
(common/read_state.lua); ranker training keeps the same index in memory
(`NeighbourIndex`) and scores it with `score_neighbours`. A parity test holds the two equal.

Scoring, for the current session's recent items ("seeds"):
1. each seed weighs by its position, newest 1, the r-th newest (L - r) / L (vsknn's "div");
2. candidate sessions: those indexed under any seed, the `sample` most recent (by their latest time
   under the seeds), never the current session itself;
3. similarity: the sum of the weights of the seeds a candidate holds, over sqrt(L x its size) (cosine);
4. the `k` most similar vote: an item's score is the sum of the similarities of the neighbours
   holding it; the seeds themselves are left out; the best `n` items are the source's list.
Ties break by time, then by token or item id, ascending.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import neg

from common.sequence import newest


def session_token(person_id: str, session_id: str) -> str:
    """A session's name in the neighbour keys (redis_keys.neighbour_session, item_sessions): a hash of
    the person and session, so global keys never hold a person's id and two people's equal session
    ids never merge. Serving's read script computes the same (common/speed_state.py, `own`)."""
    return hashlib.sha1(f"{person_id}\x00{session_id}".encode()).hexdigest()[:16]


def seed_weights(seeds: Mapping[str, float]) -> dict[str, float]:
    """item -> weight: the newest seed 1, the r-th newest (L - r) / L (ties in time by item id)."""
    ordered = sorted(seeds.items(), key=lambda kv: (-kv[1], kv[0]))
    size = len(ordered)
    return {item: (size - rank) / size for rank, (item, _) in enumerate(ordered)}


def score_neighbours(
    seeds: Mapping[str, float],
    index: Mapping[str, Mapping[str, float]],
    session_items: Callable[[str], Mapping[str, float]],
    own_token: str,
    sample: int,
    k: int,
    n: int,
) -> list[tuple[str, float]]:
    """The neighbour list (item, score), best first. `index`: seed -> token -> time; `session_items`:
    token -> its items (empty for a session no longer kept)."""
    weights = seed_weights(seeds)
    latest: dict[str, float] = {}
    dot: dict[str, float] = defaultdict(float)
    for seed, weight in weights.items():
        for token, at in index.get(seed, {}).items():
            if token == own_token:
                continue
            latest[token] = max(latest.get(token, -math.inf), at)
            dot[token] += weight
    # Tuples ordered at C level: a key function would run once per session of the seeds' rows.
    candidates = [token for _, token in sorted(zip(map(neg, latest.values()), latest.keys(), strict=True))[:sample]]
    similarity: dict[str, float] = {}
    members: dict[str, Mapping[str, float]] = {}
    for token in candidates:
        items = session_items(token)
        if items:
            members[token] = items
            similarity[token] = dot[token] / math.sqrt(len(weights) * len(items))
    nearest = sorted(similarity, key=lambda t: (-similarity[t], t))[:k]
    scores: dict[str, float] = defaultdict(float)
    for token in nearest:
        for item in members[token]:
            if item not in seeds:
                scores[item] += similarity[token]
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


@dataclass
class NeighbourIndex:
    """The speed layer's neighbour index in memory, fed in arrival order (ranker training)."""

    per_item: int  # speed.neighbour_sessions_per_item
    recent_n: int  # speed.recent_items
    ttl_s: float  # speed.neighbour_session_ttl_s, by event time
    sessions: dict[str, dict[str, float]] = field(default_factory=dict)  # token -> item -> time
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # item -> token -> time
    _session_at: dict[str, float] = field(default_factory=dict)  # a key's last write (its TTL's start)
    _item_at: dict[str, float] = field(default_factory=dict)

    def add(self, token: str, item: str, ts_s: float) -> None:
        """`item` entered the session `token`'s recent items at `ts_s`."""
        members = self.sessions.setdefault(token, {})
        members[item] = ts_s
        if len(members) > self.recent_n:  # the newest recent_n, as the script's trim
            self.sessions[token] = newest(members, self.recent_n)
        row = self.items.setdefault(item, {})
        row[token] = ts_s
        if len(row) > 2 * self.per_item:  # trimmed to per_item once twice as many, as the script
            self.items[item] = newest(row, self.per_item)
        self._session_at[token] = max(self._session_at.get(token, ts_s), ts_s)
        self._item_at[item] = max(self._item_at.get(item, ts_s), ts_s)

    def rows(self, seeds: Mapping[str, float], now_s: float) -> dict[str, Mapping[str, float]]:
        """The seeds' index rows that have not expired at `now_s`, each its per_item newest sessions
        (what serving reads: the key may hold up to twice as many before its trim)."""
        return {s: newest(self.items[s], self.per_item) for s in seeds if s in self.items and self._item_at[s] > now_s - self.ttl_s}

    def session(self, token: str, now_s: float) -> Mapping[str, float]:
        if self._session_at.get(token, -math.inf) <= now_s - self.ttl_s:
            return {}
        return self.sessions.get(token, {})
