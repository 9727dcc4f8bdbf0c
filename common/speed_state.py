"""Serving's read of the speed layer's Redis state for one request, and the speed layer's health.

The speed layer writes these keys (speed_layer/); serving reads them only through
`read_speed_state`, which gathers what a request needs in one round trip: a read-only script
follows what depends on earlier answers (the latest session, its items' co-visits, its preferred
categories' bestsellers) inside Redis. Only a device that has logged in costs a second read.

On Redis Cluster a script reads one slot: the same script reads the person's keys (the global ones it
declares stand in as an absent key of the person's), and the keys of no person are read by pipelines,
one round trip per node each: the flags' script, trending and day counts beside the script, then what
depends on its answer (co-visits, bestsellers, the session neighbours' index rows), then the
neighbour sessions' items, scored by common/neighbours.py as the script scores them.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import redis
from redis.exceptions import NoScriptError

from common import redis_keys
from common.features import POP_DAYS, day_index
from common.lua import load_script
from common.neighbours import score_neighbours, session_token
from common.redis_server import is_cluster, lean_pipeline
from common.sequence import follow_weights, heaviest

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


@dataclass(frozen=True)
class NeighbourQuery:
    """Session-kNN parameters of a read: settings.training.candidates' neighbour_sample, neighbour_k and
    neighbours (n), and speed.neighbour_sessions_per_item (each seed's newest sessions read)."""

    sample: int
    k: int
    n: int
    per_item: int


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
    neighbours: list[tuple[str, float]] = field(default_factory=list)  # session-kNN items, best first

    def impersonal(self) -> SpeedState:
        """The state without anything of the person or their session (what a request without
        personalisation consent may use): the item-level lists and flags stay."""
        return replace(
            self, session_id=None, session_items={}, category_affinity={}, cart={}, session_counts={},
            person_items={}, purchases={}, delta=None, delta_events=0, covisitation={}, neighbours=[],
        )  # fmt: skip

    @property
    def delta_is_current(self) -> bool:
        """True when the delta belongs to the version the speed layer has finished rebuilding."""
        return self.model_version is not None and self.model_version == self.speed_version


@dataclass(frozen=True)
class ItemFlags:
    """The live out-of-stock and promoted sets as of `token` (None: no token was ever written)."""

    token: str | None = None
    out_of_stock: frozenset[str] = frozenset()
    promoted: frozenset[str] = frozenset()


class ItemFlagsCopy:
    """A process's copy of the live item flags. A read sends the copy's token and gets both sets back
    only when they changed since (read_flags.lua): a store's out-of-stock set holds thousands of items,
    and sent with every request it cost more than the rest of the read (the serve bench, 2,500 of 50k
    items out of stock: 2.6 against 1.9 ms of the worker's CPU and 1.07 against 0.39 ms of Redis' a
    request). Threads may share one: each read decodes against the flags whose token it sent, and a
    read that got the sets replaces `flags` whole."""

    def __init__(self) -> None:
        self.flags = ItemFlags()


@dataclass(frozen=True)
class TrendingTop:
    """TRENDING_TOP's `n` best as of `token` (None: no token was ever written), best first."""

    token: str | None = None
    n: int = 0
    items: tuple[tuple[str, float], ...] = ()


class TrendingCopy:
    """A process's copy of the trending list. A read sends the copy's token and gets the list back only
    when it changed since (read_trending.lua): trending is re-summed every few seconds, and Redis formats
    each of its scores as text for every read (the serve bench's 20 a request: 4.6 % of Redis'
    instructions a request). A copy of the n best answers every read of n or fewer. Threads may share
    one, as ItemFlagsCopy."""

    def __init__(self) -> None:
        self.top = TrendingTop()


def read_speed_state(
    client: redis.Redis,
    person_id: str,
    *,
    anonymous_id: str | None = None,
    session_id: str | None = None,
    model_version: str | None = None,
    covis_items: Sequence[str] | None = None,
    categories: Sequence[str] = (),
    top_categories: int = 0,
    candidate_items: Sequence[str] = (),
    now_s: float | None = None,
    trending_n: int = 100,
    covis_n: int = 50,
    bestsellers_n: int = 50,
    bestsellers_half_life_s: float = 7 * 86400,
    neighbours: NeighbourQuery | None = None,
    flags: ItemFlagsCopy | None = None,
    trending: TrendingCopy | None = None,
) -> SpeedState:
    """Read one request's speed-layer state in one round trip; raises redis.RedisError when Redis is down.

    `person_id` is the user id when known, else the anonymous id; a device that has logged in is
    resolved to its user through the alias. `covis_items` None means the session's own items.
    Bestsellers come for `categories` and the session's `top_categories` preferred ones.
    `candidate_items` get per-day popularity counts for the POP_DAYS days up to `now_s`'s day.
    Pass settings.speed.bestsellers_half_life_s so bestseller weights come back decayed to `now_s`.
    `neighbours` asks for the session's session-kNN list (common/neighbours.py); None or n=0 skips it.
    `flags`: the process's copy of the item flags, read again only when they changed (None: read them).
    `trending`: the process's copy of the trending list, likewise.
    """
    now_s = time.time() if now_s is None else now_s
    days = [day_index(now_s) - POP_DAYS + 1 + i for i in range(POP_DAYS)] if candidate_items else []
    query = _ReadQuery(
        person_id, anonymous_id, session_id, model_version, covis_items, tuple(categories), top_categories,
        trending_n, covis_n, bestsellers_n, tuple(days), tuple(candidate_items), neighbours,
    )  # fmt: skip
    return _read_state(client, query, now_s, bestsellers_half_life_s, flags, trending)


def _read_state(
    client: redis.Redis,
    query: _ReadQuery,
    now_s: float,
    bestsellers_half_life_s: float,
    flags_copy: ItemFlagsCopy | None,
    trending_copy: TrendingCopy | None,
) -> SpeedState:
    # What the copies hold as the read sends their tokens (another thread may replace them meanwhile).
    known_flags = flags_copy.flags if flags_copy is not None else ItemFlags()
    known_top = trending_copy.top if trending_copy is not None else TrendingTop()
    copied = [item_flags_call(known_flags), trending_call(known_top, query.trending_n)]
    reply, (flags_reply, trending_reply), day_replies = _run_read(client, query, copied)
    alias = _text(reply[0])
    if alias and alias != query.person_id:  # a device that logged in: read again as its user (rare)
        as_user = replace(query, person_id=alias, anonymous_id=None)
        return _read_state(client, as_user, now_s, bestsellers_half_life_s, flags_copy, trending_copy)
    flags = item_flags(flags_reply, known_flags, flags_copy)
    top = trending_top(trending_reply, known_top, query.trending_n, trending_copy)
    person_id, model_version, candidate_items = query.person_id, query.model_version, query.candidate_items
    (
        _,
        session,
        recent,
        cats,
        cart,
        counts,
        items,
        purchases,
        delta,
        n,
        version,
        covis,
        best,
        nearest,
        nearest_scores,
    ) = reply
    state = SpeedState(person_id=person_id, session_id=_text(session), model_version=model_version)
    if state.session_id is not None:
        state.session_items = _timed(recent)
        state.category_affinity = {k: float(v) for k, v in _flat_pairs_raw(cats) if not k.startswith("_")}
        state.cart = {k: int(float(v)) for k, v in _flat_pairs_raw(cart)}
        state.session_counts = {k: int(v) for k, v in _flat_pairs_raw(counts)}
    state.person_items = dict(_flat_pairs(items))
    state.purchases = _timed(purchases)
    if isinstance(delta, bytes) and delta:
        state.delta = np.frombuffer(delta, dtype="<f4").copy()
        state.delta_events = int(n or 0)
    state.speed_version = _text(version)
    state.trending = list(top.items[: query.trending_n])
    state.covisitation = {_text(item) or "": covisit_row(row, query.covis_n) for item, row in covis}
    scale = 1.0 / forward_decay(now_s, bestsellers_half_life_s)
    state.category_bestsellers = {
        _text(category) or "": {i: w * scale for i, w in _flat_pairs(pairs)} for category, pairs in best
    }
    state.out_of_stock, state.promoted = flags.out_of_stock, flags.promoted
    state.neighbours = list(zip(texts(nearest), _unpacked_doubles(nearest_scores), strict=True))
    state.candidate_items = list(candidate_items)
    state.day_counts = np.zeros((len(candidate_items), POP_DAYS), dtype=np.float64)
    for j, day_reply in enumerate(day_replies):
        state.day_counts[:, j] = [float(v) if v is not None else 0.0 for v in day_reply]
    return state


def read_heartbeats(client: redis.Redis) -> dict[str, float]:
    """consumer name -> seconds since its last beat (for /metrics and `recs speed status`)."""
    now_ms = time.time() * 1000
    beats = client.hgetall(redis_keys.SPEED_HEARTBEAT)
    return {(_text(k) or ""): max(0.0, (now_ms - float(v)) / 1000) for k, v in beats.items()}


# ---------------------------------------------------------------- the read script

T = TypeVar("T")

# Serving's read-only scripts (the .lua files beside this one declare their KEYS and ARGV).
READ_STATE = load_script("common", "read_state.lua")
READ_FLAGS = load_script("common", "read_flags.lua")
READ_TRENDING = load_script("common", "read_trending.lua")
_FLAGS_KEYS = READ_FLAGS.keys.pack(
    token=redis_keys.ITEM_FLAGS_TOKEN, out_of_stock=redis_keys.OUT_OF_STOCK, promoted=redis_keys.PROMOTED
)
_TRENDING_KEYS = READ_TRENDING.keys.pack(token=redis_keys.TRENDING_TOP_TOKEN, top=redis_keys.TRENDING_TOP)


def item_flags_call(known: ItemFlags) -> tuple[Any, ...]:
    """read_flags.lua's call for a reader that holds `known`."""
    return ("EVALSHA_RO", READ_FLAGS.sha, len(_FLAGS_KEYS), *_FLAGS_KEYS, *READ_FLAGS.argv.pack(known=known.token or ""))


def item_flags(reply: Sequence[Any], known: ItemFlags, copy: ItemFlagsCopy | None = None) -> ItemFlags:
    """The flags in read_flags.lua's `reply` to a reader that held `known`; kept in `copy` when new."""
    if len(reply) == 1:  # the token of `known`: unchanged
        return known
    flags = ItemFlags(_text(reply[0]), frozenset(texts(reply[1])), frozenset(texts(reply[2])))
    if copy is not None and flags.token is not None:
        copy.flags = flags
    return flags


def trending_call(known: TrendingTop, n: int) -> tuple[Any, ...]:
    """read_trending.lua's call for the `n` best, by a reader that holds `known` (a copy of fewer is none)."""
    token = (known.token or "") if known.n >= n else ""
    args = READ_TRENDING.argv.pack(known=token, n=n)
    return ("EVALSHA_RO", READ_TRENDING.sha, len(_TRENDING_KEYS), *_TRENDING_KEYS, *args)


def trending_top(reply: Sequence[Any], known: TrendingTop, n: int, copy: TrendingCopy | None = None) -> TrendingTop:
    """The list in read_trending.lua's `reply` to a reader that held `known` and asked for `n`; kept in
    `copy` when new."""
    if len(reply) == 1:  # the token of `known`: unchanged
        return known
    top = TrendingTop(_text(reply[0]), n, tuple(_flat_pairs(flat_scored(reply[1]))))
    if copy is not None and top.token is not None:
        copy.top = top
    return top


def load_read_scripts(client: redis.Redis) -> None:
    """Load serving's read scripts (a restarted Redis, or a newly promoted master, forgot them)."""
    for script in (READ_STATE, READ_FLAGS, READ_TRENDING):
        client.script_load(script.source)


def with_read_scripts(client: redis.Redis, run: Callable[[], T]) -> T:
    """`run()`, which calls serving's read scripts; once more after loading them when Redis forgot them."""
    try:
        return run()
    except NoScriptError:  # a restarted Redis forgot them
        load_read_scripts(client)
        return run()


@dataclass(frozen=True)
class _ReadQuery:
    """What one read asks for (`read_speed_state`'s arguments, `days` from its moment)."""

    person_id: str
    anonymous_id: str | None
    session_id: str | None
    model_version: str | None
    covis_items: Sequence[str] | None
    categories: tuple[str, ...]
    top_categories: int
    trending_n: int
    covis_n: int
    bestsellers_n: int
    days: tuple[int, ...]
    candidate_items: tuple[str, ...]
    neighbours: NeighbourQuery | None


def _run_read(
    client: redis.Redis, query: _ReadQuery, copied: list[tuple[Any, ...]]
) -> tuple[list[Any], list[Any], list[Any]]:
    """The read script's reply, the replies to `copied` (the calls of the process's copies: the flags' and
    trending's scripts) and the day counts' replies, in one round trip (loading the scripts once if needed)."""
    if is_cluster(client):
        return _run_read_on_cluster(client, query, copied)
    keys, args = _read_call(query)
    calls = [
        ("EVALSHA_RO", READ_STATE.sha, len(keys), *keys, *args), *copied,
        *(("ZMSCORE", redis_keys.popularity_day(day), *query.candidate_items) for day in query.days),
    ]  # fmt: skip
    replies = with_read_scripts(client, lambda: lean_pipeline(client, calls))
    return replies[0], replies[1 : 1 + len(copied)], replies[1 + len(copied) :]


def _global_argv() -> dict[str, Any]:
    """The read script's ARGV that is the same for every call: the global families' key templates."""
    covis = redis_keys.grouped_template(redis_keys.covisitation)
    bestsellers = redis_keys.grouped_template(redis_keys.category_bestsellers)
    nb_session = redis_keys.grouped_template(redis_keys.neighbour_session)
    nb_item = redis_keys.grouped_template(redis_keys.item_sessions)
    return dict(
        covis_prefix=covis[0], covis_middle=covis[1], covis_suffix=covis[2], bestsellers_prefix=bestsellers[0],
        bestsellers_middle=bestsellers[1], bestsellers_suffix=bestsellers[2], nb_session_prefix=nb_session[0],
        nb_session_middle=nb_session[1], nb_session_suffix=nb_session[2], nb_item_prefix=nb_item[0],
        nb_item_middle=nb_item[1], nb_item_suffix=nb_item[2], n_groups=redis_keys.SLOT_GROUPS,
    )  # fmt: skip


_GLOBAL_ARGV = _global_argv()  # built once: a read only adds the request's values


def _read_call(q: _ReadQuery) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of the read script."""
    person_id, covis_items = q.person_id, q.covis_items
    version = q.model_version or ""  # no version: a delta key that never exists
    keys = READ_STATE.keys.pack(
        alias=redis_keys.alias(q.anonymous_id or person_id), person_sessions=redis_keys.person_sessions(person_id),
        person_items=redis_keys.person_items(person_id), purchases=redis_keys.person_purchases(person_id),
        delta=redis_keys.user_delta(person_id, version), delta_count=redis_keys.user_event_count(person_id, version),
        speed_version=redis_keys.SPEED_VERSION,
    )  # fmt: skip
    recent = redis_keys.template(redis_keys.session_recent, person_id)
    cats = redis_keys.template(redis_keys.session_categories, person_id)
    cart = redis_keys.template(redis_keys.session_cart, person_id)
    counts = redis_keys.template(redis_keys.session_counts, person_id)
    query = q.neighbours or NeighbourQuery(sample=0, k=0, n=0, per_item=0)
    args = READ_STATE.argv.pack(
        session=q.session_id or "", covis_n=q.covis_n, bestsellers_n=q.bestsellers_n,
        top_categories=q.top_categories, recent_prefix=recent[0], recent_suffix=recent[1], cats_prefix=cats[0],
        cats_suffix=cats[1], cart_prefix=cart[0], cart_suffix=cart[1], counts_prefix=counts[0],
        counts_suffix=counts[1], person=person_id, neighbour_sample=query.sample, neighbour_k=query.k,
        neighbour_n=query.n, covis_items_given=-1 if covis_items is None else len(covis_items),
        neighbour_per_item=query.per_item, covis_item=covis_items or (), category=q.categories, **_GLOBAL_ARGV,
    )  # fmt: skip
    READ_STATE.check(keys, args, covis_items=len(covis_items or ()), categories=len(q.categories))
    return keys, args


def _run_read_on_cluster(
    client: redis.Redis, q: _ReadQuery, copied: list[tuple[Any, ...]]
) -> tuple[list[Any], list[Any], list[Any]]:
    """`_run_read`'s replies on Redis Cluster, in the script's shape (see the module's docstring)."""
    person_id, anonymous_id, covis_items = q.person_id, q.anonymous_id, q.covis_items
    # The script's person part: no seeds, categories or neighbours, its global KEYS an absent key.
    keys, args = _read_call(replace(q, covis_items=(), categories=(), top_categories=0, neighbours=None))
    absent = redis_keys.person_placeholder(person_id)
    global_keys = {redis_keys.SPEED_VERSION}
    keys = [absent if k in global_keys or k == redis_keys.alias(anonymous_id or person_id) else k for k in keys]
    first = _cluster_round(client, [
        ("EVALSHA_RO", READ_STATE.sha, len(keys), *keys, *args),
        ("GET", redis_keys.alias(anonymous_id or person_id)), ("GET", redis_keys.SPEED_VERSION), *copied,
        *(("ZMSCORE", redis_keys.popularity_day(day), *q.candidate_items) for day in q.days),
    ])  # fmt: skip
    person, alias, version = first[:3]
    copied_replies, day_replies = first[3 : 3 + len(copied)], first[3 + len(copied) :]
    session, recent, cats = person[1], flat_scored(person[2]), flat_scored(person[3])
    recent_pairs = list(_flat_pairs(recent))
    seeds = [item for item, _ in recent_pairs] if covis_items is None else list(covis_items)
    wanted = list(dict.fromkeys(q.categories))
    preferred = sorted(
        ((name, float(w)) for name, w in _flat_pairs_raw(cats) if not name.startswith("_") and float(w) > 0),
        key=lambda kv: (-kv[1], kv[0]),
    )
    wanted += [name for name, _ in preferred[:q.top_categories] if name not in wanted]
    query = q.neighbours or NeighbourQuery(sample=0, k=0, n=0, per_item=0)
    nb_seeds = dict(recent_pairs) if query.n > 0 and _text(session) and recent_pairs else {}
    second = _cluster_round(client, [
        *(("HGETALL", redis_keys.covisitation(i)) for i in seeds),
        *(("ZREVRANGE", redis_keys.category_bestsellers(c), 0, q.bestsellers_n - 1, "WITHSCORES") for c in wanted),
        *(("ZREVRANGE", redis_keys.item_sessions(i), 0, query.per_item - 1, "WITHSCORES") for i in nb_seeds),
    ])  # fmt: skip
    covis = [[item, row] for item, row in zip(seeds, second, strict=False)]
    best = [[name, flat_scored(row)] for name, row in zip(wanted, second[len(seeds) :], strict=False)]
    nearest: list[str] = []
    nearest_scores = b""
    if nb_seeds:
        rows = {s: dict(_flat_pairs(flat_scored(row))) for s, row in zip(nb_seeds, second[len(seeds) + len(wanted) :], strict=True)}
        own = session_token(person_id, _text(session) or "")
        asked: list[str] = []  # the candidates the scoring reads, in its order: read them, then score

        def ask(token: str) -> Mapping[str, float]:
            asked.append(token)
            return {}

        score_neighbours(nb_seeds, rows, ask, own, query.sample, query.k, query.n)
        members = _cluster_round(client, [("ZRANGE", redis_keys.neighbour_session(t), 0, -1) for t in asked])
        items = {t: dict.fromkeys((_text(m) or "" for m in found), 0.0) for t, found in zip(asked, members, strict=True)}
        scored = score_neighbours(nb_seeds, rows, lambda t: items.get(t, {}), own, query.sample, query.k, query.n)
        nearest = [item for item, _ in scored]
        nearest_scores = _packed_doubles([score for _, score in scored])
    reply = [alias, *person[1:10], version, covis, best, nearest, nearest_scores]
    return reply, copied_replies, day_replies


def _cluster_round(client: redis.Redis, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """One pipeline of the cluster client (one round trip per node); loads the read scripts where a
    node lacks them (a restarted or newly promoted master) and asks once more."""
    if not calls:
        return []
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call)
        replies = pipe.execute(raise_on_error=False)
        if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
            load_read_scripts(client)
            continue
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)
    raise AssertionError("unreachable: the second attempt returns or raises")


def covisit_row(reply: Any, n: int) -> dict[str, float]:
    """A co-visit row (redis_keys.covisitation, a hash read whole: HGETALL's reply flat from a script, a
    dict from a pipeline) as follower -> weight, its n heaviest where it holds more (ties by member
    descending, as a sorted set's ZREVRANGE gave them); a row within n comes in the order Redis keeps it."""
    if isinstance(reply, dict):
        row = follow_weights(texts(list(reply)), _units(list(reply.values())))
    else:
        row = follow_weights(texts(reply[0::2]), _units(reply[1::2]))
    return row if len(row) <= n else heaviest(row, n, ties_descending=True)


def flat_scored(reply: Any) -> list[Any]:
    """A sorted-set reply WITHSCORES, raw (a script's, or a command sent with execute_command), as
    [member, score, ...]: RESP3 nests pairs."""
    if not reply:
        return []
    if isinstance(reply[0], list | tuple):
        return [x for pair in reply for x in pair]
    return list(reply)


def _flat_pairs(reply: Any) -> Iterator[tuple[str, float]]:
    """[member, score, member, score, ...] (a script's WITHSCORES reply) as (member, score) pairs."""
    # ~25 pairs a list, ~20 lists a request: decoded in C
    return zip(texts(reply[0::2]), map(float, reply[1::2]), strict=False)


def _timed(reply: Any) -> dict[str, float]:
    """A time-scored sorted set's WITHSCORES reply as member -> epoch seconds."""
    return {member: redis_keys.score_seconds(score) for member, score in _flat_pairs(reply)}


def _units(scores: Sequence[Any]) -> list[int] | list[float]:
    """A co-visit row's scores: whole units as Redis formats them, read by int() (~0.13 us against
    float()'s ~0.21); floats where a reply holds floats (RESP3 on a cluster) or text int() cannot read."""
    if scores and isinstance(scores[0], bytes):
        try:
            return list(map(int, scores))
        except ValueError:
            pass
    return list(map(float, scores))


def _flat_pairs_raw(reply: Any) -> Iterator[tuple[str, Any]]:
    """A script's HGETALL reply as (field, value) pairs, the values as Redis gave them (int() and
    float() read bytes as they read text)."""
    return zip(texts(reply[0::2]), reply[1::2], strict=False)


def texts(values: Collection[Any]) -> Iterator[str]:
    """Members as text: a script's reply holds bytes, decoded in C; the cluster path's own lists (its
    seeds, categories and neighbours) hold text already. On a cluster SMEMBERS gives a set."""
    if isinstance(next(iter(values), None), bytes):
        return map(bytes.decode, values)
    return map(str, values)


def _packed_doubles(values: Sequence[float]) -> bytes:
    """Floats as the read script packs its neighbour scores (struct.pack('<d') each)."""
    return struct.pack(f"<{len(values)}d", *values)


def _unpacked_doubles(packed: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(packed) // 8}d", packed)


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if isinstance(value, bytes):
        return value.decode() or None
    return str(value) or None
