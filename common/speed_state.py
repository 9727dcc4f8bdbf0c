"""Serving's read of the speed layer's Redis state for one request, and the speed layer's health.

The speed layer writes these keys (speed_layer/); serving reads them only through
`read_speed_state`, which gathers what a request needs in one round trip: a read-only script
follows what depends on earlier answers (the latest session, its items' co-visits, its preferred
categories' bestsellers) inside Redis. Only a device that has logged in costs a second read.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from redis.exceptions import NoScriptError

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
    top_categories: int = 0,
    candidate_items: Sequence[str] = (),
    now_s: float | None = None,
    trending_n: int = 100,
    covis_n: int = 50,
    bestsellers_n: int = 50,
    bestsellers_half_life_s: float = 7 * 86400,
    neighbours: NeighbourQuery | None = None,
) -> SpeedState:
    """Read one request's speed-layer state in one round trip; raises redis.RedisError when Redis is down.

    `person_id` is the user id when known, else the anonymous id; a device that has logged in is
    resolved to its user through the alias. `covis_items` None means the session's own items.
    Bestsellers come for `categories` and the session's `top_categories` preferred ones.
    `candidate_items` get per-day popularity counts for the POP_DAYS days up to `now_s`'s day.
    Pass settings.speed.bestsellers_half_life_s so bestseller weights come back decayed to `now_s`.
    `neighbours` asks for the session's session-kNN list (common/neighbours.py); None or n=0 skips it.
    """
    now_s = time.time() if now_s is None else now_s
    days = [day_index(now_s) - POP_DAYS + 1 + i for i in range(POP_DAYS)] if candidate_items else []
    reply, day_replies = _run_read(
        client, person_id, anonymous_id, session_id, model_version, covis_items, categories,
        top_categories, trending_n, covis_n, bestsellers_n, days, candidate_items, neighbours,
    )  # fmt: skip
    alias = _text(reply[0])
    if alias and alias != person_id:  # a device that logged in: read again as its user (rare)
        return read_speed_state(
            client, alias, session_id=session_id, model_version=model_version, covis_items=covis_items,
            categories=categories, top_categories=top_categories, candidate_items=candidate_items,
            now_s=now_s, trending_n=trending_n, covis_n=covis_n, bestsellers_n=bestsellers_n,
            bestsellers_half_life_s=bestsellers_half_life_s, neighbours=neighbours,
        )  # fmt: skip
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
        trending,
        covis,
        best,
        oos,
        promo,
        nearest,
    ) = reply
    state = SpeedState(person_id=person_id, session_id=_text(session), model_version=model_version)
    if state.session_id is not None:
        state.session_items = dict(_flat_pairs(recent))
        state.category_affinity = {k: float(v) for k, v in _flat_pairs_text(cats) if not k.startswith("_")}
        state.cart = {k: int(float(v)) for k, v in _flat_pairs_text(cart)}
        state.session_counts = {k: int(v) for k, v in _flat_pairs_text(counts)}
    state.person_items = dict(_flat_pairs(items))
    state.purchases = dict(_flat_pairs(purchases))
    if isinstance(delta, bytes) and delta:
        state.delta = np.frombuffer(delta, dtype="<f4").copy()
        state.delta_events = int(n or 0)
    state.speed_version = _text(version)
    state.trending = _flat_pairs(trending)
    state.covisitation = {_text(item) or "": dict(_flat_pairs(pairs)) for item, pairs in covis}
    scale = 1.0 / forward_decay(now_s, bestsellers_half_life_s)
    state.category_bestsellers = {
        _text(category) or "": {i: w * scale for i, w in _flat_pairs(pairs)} for category, pairs in best
    }
    state.out_of_stock = frozenset(_text(m) or "" for m in oos)
    state.promoted = frozenset(_text(m) or "" for m in promo)
    state.neighbours = _flat_pairs(nearest)
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

# One read-only script gathers what depends on earlier answers (the alias, the latest session, the
# session's items and preferred categories) without more round trips. Key names come from
# redis_keys as prefix/suffix templates, so this file stays the only place that spells them.
# KEYS: 1 alias  2 person sessions  3 person items  4 purchases  5 delta  6 delta count  7 speed version
#       8 trending top  9 out of stock  10 promoted
# ARGV: 1 session ('' = the latest)  2 trending_n  3 covis_n  4 bestsellers_n  5 top categories
#       6..13 prefix/suffix of the session's recent, cats, cart, counts keys  14/15 covis key
#       16/17 bestsellers key  18/19 neighbour-session key  20/21 item's neighbour-sessions key
#       22 the person id (for the session's token)  23 neighbour sample  24 neighbour k  25 neighbours n (0: off)
#       26 number of explicit covis items (-1: the session's items)  27 neighbour sessions read per item
#       (its newest), then the explicit covis items, then the explicit categories.
# Returns: alias, session, recent, cats, cart, counts, person items, purchases, delta, delta count,
# speed version, trending, {item, covis}..., {category, bestsellers}..., out of stock, promoted,
# neighbours (item, score as text, ...: common/neighbours.py scores the same way).
READ_STATE = r"""
local alias = redis.call('GET', KEYS[1])
local session = ARGV[1]
if session == '' then session = redis.call('ZREVRANGE', KEYS[2], 0, 0)[1] or false end
local function session_key(i)
  return ARGV[4 + 2 * i] .. session .. ARGV[5 + 2 * i]
end
local recent, cats, cart, counts = {}, {}, {}, {}
if session then
  recent = redis.call('ZRANGE', session_key(1), 0, -1, 'WITHSCORES')
  cats = redis.call('HGETALL', session_key(2))
  cart = redis.call('HGETALL', session_key(3))
  counts = redis.call('HGETALL', session_key(4))
end

local covis_n, n_items = tonumber(ARGV[3]), tonumber(ARGV[26])
local seeds = {}
if n_items < 0 then
  for i = 1, #recent, 2 do seeds[#seeds + 1] = recent[i] end
else
  for i = 1, n_items do seeds[#seeds + 1] = ARGV[27 + i] end
end
local covis = {}
for _, item in ipairs(seeds) do
  covis[#covis + 1] = {item, redis.call('ZREVRANGE', ARGV[14] .. item .. ARGV[15], 0, covis_n - 1, 'WITHSCORES')}
end

local wanted, chosen = {}, {}
for i = 28 + math.max(n_items, 0), #ARGV do
  if not chosen[ARGV[i]] then chosen[ARGV[i]] = true; wanted[#wanted + 1] = ARGV[i] end
end
local preferred = {}
for i = 1, #cats, 2 do
  local weight = tonumber(cats[i + 1])
  if string.sub(cats[i], 1, 1) ~= '_' and weight and weight > 0 then preferred[#preferred + 1] = {cats[i], weight} end
end
table.sort(preferred, function(x, y) return x[2] > y[2] end)
for i = 1, math.min(tonumber(ARGV[5]), #preferred) do
  local category = preferred[i][1]
  if not chosen[category] then chosen[category] = true; wanted[#wanted + 1] = category end
end
local best, best_n = {}, tonumber(ARGV[4])
for _, category in ipairs(wanted) do
  best[#best + 1] = {category, redis.call('ZREVRANGE', ARGV[16] .. category .. ARGV[17], 0, best_n - 1, 'WITHSCORES')}
end

-- Session neighbours of the session's recent items (common/neighbours.py is the definition).
local function by_then(value)
  return function(x, y)
    if value[x] ~= value[y] then return value[x] > value[y] end
    return x < y
  end
end
local neighbours = {}
local nb_n = tonumber(ARGV[25])
if nb_n > 0 and session and #recent > 0 then
  local size, at, ordered, is_seed = #recent / 2, {}, {}, {}
  for i = 1, #recent, 2 do
    at[recent[i]] = tonumber(recent[i + 1]); ordered[#ordered + 1] = recent[i]; is_seed[recent[i]] = true
  end
  table.sort(ordered, by_then(at))
  local own = string.sub(redis.sha1hex(ARGV[22] .. '\0' .. session), 1, 16)
  local latest, dot, candidates = {}, {}, {}
  for rank, seed in ipairs(ordered) do
    local weight = (size - rank + 1) / size
    local row = redis.call('ZREVRANGE', ARGV[20] .. seed .. ARGV[21], 0, tonumber(ARGV[27]) - 1, 'WITHSCORES')
    for i = 1, #row, 2 do
      local token, t = row[i], tonumber(row[i + 1])
      if token ~= own then
        if latest[token] == nil then candidates[#candidates + 1] = token; dot[token] = 0 end
        if latest[token] == nil or t > latest[token] then latest[token] = t end
        dot[token] = dot[token] + weight
      end
    end
  end
  table.sort(candidates, by_then(latest))
  local similarity, members, nearest = {}, {}, {}
  for i = 1, math.min(tonumber(ARGV[23]), #candidates) do
    local token = candidates[i]
    local items = redis.call('ZRANGE', ARGV[18] .. token .. ARGV[19], 0, -1)
    if #items > 0 then
      members[token] = items
      similarity[token] = dot[token] / math.sqrt(size * #items)
      nearest[#nearest + 1] = token
    end
  end
  table.sort(nearest, by_then(similarity))
  local scores, listed = {}, {}
  for i = 1, math.min(tonumber(ARGV[24]), #nearest) do
    local token = nearest[i]
    for _, item in ipairs(members[token]) do
      if not is_seed[item] then
        if scores[item] == nil then scores[item] = 0; listed[#listed + 1] = item end
        scores[item] = scores[item] + similarity[token]
      end
    end
  end
  table.sort(listed, by_then(scores))
  for i = 1, math.min(nb_n, #listed) do
    neighbours[#neighbours + 1] = listed[i]
    neighbours[#neighbours + 1] = string.format('%.17g', scores[listed[i]])
  end
end

return {
  alias, session, recent, cats, cart, counts,
  redis.call('HGETALL', KEYS[3]), redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES'),
  redis.call('GET', KEYS[5]), redis.call('GET', KEYS[6]), redis.call('GET', KEYS[7]),
  redis.call('ZREVRANGE', KEYS[8], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES'),
  covis, best, redis.call('SMEMBERS', KEYS[9]), redis.call('SMEMBERS', KEYS[10]), neighbours,
}
"""
_READ_STATE_SHA = hashlib.sha1(READ_STATE.encode()).hexdigest()


def _run_read(
    client: redis.Redis,
    person_id: str,
    anonymous_id: str | None,
    session_id: str | None,
    model_version: str | None,
    covis_items: Sequence[str] | None,
    categories: Sequence[str],
    top_categories: int,
    trending_n: int,
    covis_n: int,
    bestsellers_n: int,
    days: Sequence[int],
    candidate_items: Sequence[str],
    neighbours: NeighbourQuery | None,
) -> tuple[list[Any], list[Any]]:
    """The script's reply and the day counts' replies, in one pipeline (loading the script once if needed)."""
    version = model_version or ""  # no version: a delta key that never exists
    keys = [
        redis_keys.alias(anonymous_id or person_id), redis_keys.person_sessions(person_id),
        redis_keys.person_items(person_id), redis_keys.person_purchases(person_id),
        redis_keys.user_delta(person_id, version), redis_keys.user_event_count(person_id, version),
        redis_keys.SPEED_VERSION, redis_keys.TRENDING_TOP, redis_keys.OUT_OF_STOCK, redis_keys.PROMOTED,
    ]  # fmt: skip
    args: list[Any] = [session_id or "", trending_n, covis_n, bestsellers_n, top_categories]
    for key_of in (redis_keys.session_recent, redis_keys.session_categories, redis_keys.session_cart,
                   redis_keys.session_counts):  # fmt: skip
        args += redis_keys.template(key_of, person_id)
    args += redis_keys.template(redis_keys.covisitation)
    args += redis_keys.template(redis_keys.category_bestsellers)
    args += redis_keys.template(redis_keys.neighbour_session) + redis_keys.template(redis_keys.item_sessions)
    query = neighbours or NeighbourQuery(sample=0, k=0, n=0, per_item=0)
    args += [person_id, query.sample, query.k, query.n]
    args += [-1 if covis_items is None else len(covis_items), query.per_item, *(covis_items or ())]
    args += list(categories)

    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA_RO", _READ_STATE_SHA, len(keys), *keys, *args)
        for day in days:
            pipe.zmscore(redis_keys.popularity_day(day), list(candidate_items))
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], NoScriptError) and attempt == 0:
            client.script_load(READ_STATE)  # a restarted Redis forgot it
            continue
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[0], replies[1:]
    raise AssertionError("unreachable: the second attempt returns or raises")


def _flat_pairs(reply: Any) -> list[tuple[str, float]]:
    """[member, score, member, score, ...] (a script's WITHSCORES reply) as (member, score) pairs."""
    if not reply:
        return []
    pairs = iter(reply)  # members are bulk strings (bytes): decoded in place, ~25 per list, ~20 lists a request
    return [(m.decode() if type(m) is bytes else _text(m) or "", float(score)) for m, score in zip(pairs, pairs, strict=False)]


def _flat_pairs_text(reply: Any) -> list[tuple[str, str]]:
    """A script's HGETALL reply as (field, value) text pairs."""
    if not reply:
        return []
    pairs = iter(reply)
    return [(_text(key) or "", _text(value) or "") for key, value in zip(pairs, pairs, strict=False)]


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    if isinstance(value, bytes):
        return value.decode() or None
    return str(value) or None
