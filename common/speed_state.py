"""Serving's read of the speed layer's Redis state for one request, and the speed layer's health.

The speed layer writes these keys (speed_layer/); serving reads them only through
`read_speed_state`, which gathers what a request needs in one pipeline (a second one only
for what depends on the first answers: an aliased device, the latest session, and the
co-visitation of the session's own items).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from common import redis_keys
from common.features import POP_DAYS, day_index

# Forward decay: scores are stored as w·2^((t − EPOCH)/half-life) so one sorted set ranks by decayed
# weight at any moment without rewriting old entries. The epoch keeps exponents small (< 2^1000 for
# about 19 years at a 7-day half-life).
FORWARD_DECAY_EPOCH_S = 1_704_067_200.0  # 2024-01-01T00:00:00Z


def forward_decay(ts_s: float, half_life_s: float) -> float:
    """The multiplier of a weight observed at `ts_s` in a forward-decayed sorted set."""
    return math.pow(2.0, (ts_s - FORWARD_DECAY_EPOCH_S) / half_life_s)


def trending_decay_weights(now_s: float, bucket_s: int, window_s: int, half_life_s: int) -> dict[int, float]:
    """bucket start -> weight of that bucket in the trending sum at `now_s` (newest bucket weighs 1)."""
    newest = int(now_s // bucket_s) * bucket_s
    count = max(1, window_s // bucket_s)
    return {newest - i * bucket_s: math.pow(0.5, i * bucket_s / half_life_s) for i in range(count)}


@dataclass
class SpeedState:
    """What the speed layer knows for one request; empty fields where it knows nothing."""

    person_id: str  # after alias resolution
    session_id: str | None  # the given one, else the person's latest live session
    session_items: dict[str, float] = field(default_factory=dict)  # item -> last event time (epoch s)
    category_affinity: dict[str, float] = field(default_factory=dict)  # session, forward-decayed (any scale)
    cart: dict[str, int] = field(default_factory=dict)  # item -> quantity
    session_counts: dict[str, int] = field(default_factory=dict)  # event_type -> count in the session
    person_items: dict[str, float] = field(default_factory=dict)  # item -> implicit weight, for fold-in
    purchases: dict[str, float] = field(default_factory=dict)  # item -> last purchase time (epoch s)
    model_version: str | None = None  # the version the delta below belongs to
    delta: np.ndarray | None = None  # float32; add to the batch vector of model_version
    delta_events: int = 0
    speed_version: str | None = None  # the version the speed layer has fully rebuilt deltas for
    covisitation: dict[str, dict[str, float]] = field(default_factory=dict)  # item -> other -> count
    trending: list[tuple[str, float]] = field(default_factory=list)  # best first
    category_bestsellers: dict[str, dict[str, float]] = field(default_factory=dict)  # relative weights
    candidate_items: list[str] = field(default_factory=list)
    # candidate_items x POP_DAYS item-event counts per UTC day, oldest first (features.Candidates.day_counts)
    day_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, POP_DAYS)))
    out_of_stock: frozenset[str] = frozenset()
    promoted: frozenset[str] = frozenset()

    @property
    def delta_is_current(self) -> bool:
        """True when the delta belongs to the version the speed layer has finished rebuilding."""
        return self.model_version is not None and self.model_version == self.speed_version


def read_speed_state(
    client: redis.Redis,
    person_id: str,
    *,
    anonymous_id: str | None = None,
    session_id: str | None = None,
    model_version: str | None = None,
    covis_items: Sequence[str] | None = None,
    categories: Sequence[str] = (),
    candidate_items: Sequence[str] = (),
    now_s: float | None = None,
    trending_n: int = 100,
    covis_n: int = 50,
    bestsellers_n: int = 50,
    bestsellers_half_life_s: float = 7 * 86400,
) -> SpeedState:
    """Read one request's speed-layer state; raises redis.RedisError when Redis is down (serving degrades).

    `person_id` is the user id when known, else the anonymous id; a device that has logged in is
    resolved to its user through the alias. `covis_items` None means the session's own items.
    `candidate_items` get per-day popularity counts for the POP_DAYS days up to `now_s`'s day.
    Pass settings.speed.bestsellers_half_life_s so bestseller weights come back decayed to `now_s`.
    """
    now_s = time.time() if now_s is None else now_s
    pipe = client.pipeline(transaction=False)
    pipe.get(redis_keys.alias(anonymous_id or person_id))
    pipe.zrevrange(redis_keys.person_sessions(person_id), 0, 0)
    _queue_person(pipe, person_id, session_id, model_version)
    pipe.get(redis_keys.SPEED_VERSION)
    pipe.zrevrange(redis_keys.TRENDING_TOP, 0, trending_n - 1, withscores=True)
    for category in categories:
        pipe.zrevrange(redis_keys.category_bestsellers(category), 0, bestsellers_n - 1, withscores=True)
    days = [day_index(now_s) - POP_DAYS + 1 + i for i in range(POP_DAYS)]
    for day in days:
        if candidate_items:
            pipe.zmscore(redis_keys.popularity_day(day), list(candidate_items))
        else:
            pipe.echo("")
    for item in covis_items or ():
        pipe.zrevrange(redis_keys.covisitation(item), 0, covis_n - 1, withscores=True)
    pipe.smembers(redis_keys.OUT_OF_STOCK)
    pipe.smembers(redis_keys.PROMOTED)
    replies = iter(pipe.execute())

    alias = _text(next(replies))
    latest = [_text(s) for s in next(replies)]
    person_replies = [next(replies) for _ in range(_PERSON_READS)]
    state = SpeedState(person_id=person_id, session_id=session_id, model_version=model_version)
    state.speed_version = _text(next(replies))
    state.trending = _pairs(next(replies))
    scale = 1.0 / forward_decay(now_s, bestsellers_half_life_s)
    for category in categories:
        state.category_bestsellers[category] = {i: w * scale for i, w in _pairs(next(replies))}
    state.candidate_items = list(candidate_items)
    counts = np.zeros((len(candidate_items), POP_DAYS), dtype=np.float64)
    for j in range(POP_DAYS):
        reply = next(replies)
        if candidate_items:
            counts[:, j] = [float(v) if v is not None else 0.0 for v in reply]
    state.day_counts = counts
    for item in covis_items or ():
        state.covisitation[item] = dict(_pairs(next(replies)))
    state.out_of_stock = frozenset(_text(m) or "" for m in next(replies))
    state.promoted = frozenset(_text(m) or "" for m in next(replies))

    # What depended on the first answers: the aliased user, the latest session, the session's co-visits.
    if alias and alias != person_id:
        state.person_id = alias
        session_id = session_id or _latest_session(client, alias)
        person_replies = _read_person(client, alias, session_id, model_version)
    elif session_id is None and latest:
        session_id = latest[0]
        person_replies = _read_person(client, person_id, session_id, model_version)
    state.session_id = session_id
    _fill_person(state, person_replies)
    if covis_items is None and state.session_items:
        pipe = client.pipeline(transaction=False)
        for item in state.session_items:
            pipe.zrevrange(redis_keys.covisitation(item), 0, covis_n - 1, withscores=True)
        for item, reply in zip(state.session_items, pipe.execute(), strict=True):
            state.covisitation[item] = dict(_pairs(reply))
    return state


def read_heartbeats(client: redis.Redis) -> dict[str, float]:
    """consumer name -> seconds since its last beat (for /metrics and `recs speed status`)."""
    now_ms = time.time() * 1000
    beats = client.hgetall(redis_keys.SPEED_HEARTBEAT)
    return {(_text(k) or ""): max(0.0, (now_ms - float(v)) / 1000) for k, v in beats.items()}


# ---------------------------------------------------------------- per-person reads

_PERSON_READS = 8


def _queue_person(pipe: Any, person_id: str, session_id: str | None, model_version: str | None) -> None:
    """Queue exactly _PERSON_READS commands (placeholders where a key is unknown, to keep positions)."""
    if session_id is not None:
        pipe.zrange(redis_keys.session_recent(person_id, session_id), 0, -1, withscores=True)
        pipe.hgetall(redis_keys.session_categories(person_id, session_id))
        pipe.hgetall(redis_keys.session_cart(person_id, session_id))
        pipe.hgetall(redis_keys.session_counts(person_id, session_id))
    else:
        for _ in range(4):
            pipe.echo("")
    pipe.hgetall(redis_keys.person_items(person_id))
    pipe.zrange(redis_keys.person_purchases(person_id), 0, -1, withscores=True)
    if model_version is not None:
        pipe.get(redis_keys.user_delta(person_id, model_version))
        pipe.get(redis_keys.user_event_count(person_id, model_version))
    else:
        pipe.echo("")
        pipe.echo("")


def _read_person(
    client: redis.Redis, person_id: str, session_id: str | None, model_version: str | None
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    _queue_person(pipe, person_id, session_id, model_version)
    return list(pipe.execute())


def _latest_session(client: redis.Redis, person_id: str) -> str | None:
    latest = client.zrevrange(redis_keys.person_sessions(person_id), 0, 0)
    return _text(latest[0]) if latest else None


def _fill_person(state: SpeedState, replies: list[Any]) -> None:
    recent, cats, cart, counts, items, purchases, delta, n = replies
    if state.session_id is not None:
        state.session_items = dict(_pairs(recent))
        state.category_affinity = {k: float(v) for k, v in _text_map(cats).items() if not k.startswith("_")}
        state.cart = {k: int(float(v)) for k, v in _text_map(cart).items()}
        state.session_counts = {k: int(v) for k, v in _text_map(counts).items()}
    state.person_items = {k: float(v) for k, v in _text_map(items).items()}
    state.purchases = dict(_pairs(purchases))
    if isinstance(delta, bytes) and delta:
        state.delta = np.frombuffer(delta, dtype="<f4").copy()
        state.delta_events = int(n or 0)


def _pairs(reply: Any) -> list[tuple[str, float]]:
    return [(_text(m) or "", float(s)) for m, s in reply or []]


def _text_map(reply: Any) -> dict[str, str]:
    if not isinstance(reply, dict):
        return {}
    return {(_text(k) or ""): (_text(v) or "") for k, v in reply.items()}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode() or None
    return str(value) or None
