"""The Redis keyspace: the only place key strings are formed.

The speed layer writes these keys and serving reads them. All keys of one person (user or
anonymous device) carry the hash tag `{u:<person>}` (the id with `}`, glob characters and `%`
percent-encoded, so no id can spell another's tag), so on Redis Cluster they live in one
slot and a Lua script may touch them together. Values that depend on a model version
(user vector deltas, fold-in vectors) carry the version in the key. `holdings` lists the keys
that hold a person and the devices linked to them (what erasure deletes); `FAMILIES` names every
kind of key, with its SCAN pattern (what `recs speed status` measures memory by).

Keys linked to no person (trending, popularity, bestsellers, co-visits, session-kNN, item state, the
speed layer's bookkeeping) carry a slot-group tag `{g:<n>}`: n = `slot_group` of the key's own id,
one of SLOT_GROUPS, or a fixed group for keys read or written together (the trend buckets with the
list summed from them, the item flag sets, the bookkeeping). On Redis Cluster each group is one slot,
so the speed layer writes a group's keys in one script call and serving reads them per node; on one
Redis the tags change nothing, so both run on this one layout.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

import redis

from common.ids import id_digest
from common.neighbours import session_token
from common.redis_server import is_cluster

PREFIX = "lr"

# Pub/sub channels.
MODELS_CHANNEL = f"{PREFIX}:chan:models"  # registry -> serving and speed layer (messages.ModelEvent)
CATALOG_CHANNEL = f"{PREFIX}:chan:catalog"  # item updates that must take effect at once
RECS_CHANNEL = f"{PREFIX}:chan:recs"  # speed layer -> SSE: whose recommendations may have changed (messages.RecsChangedBatch)


# A consumer names a dozen keys of each event's person, and interleaved visitors come back every few
# hundred events: remembered, a tag costs ~0.13 µs instead of the regex's ~0.6 µs.
@functools.lru_cache(maxsize=1 << 14)
def _person(person_id: str) -> str:
    return f"{PREFIX}:{{u:{_in_tag(person_id)}}}"


# Ids may hold any printable character. In the tag, `}` would end it early (the session keys of
# person `a}:s:b` would read as person `a`'s), and glob characters would make SCAN patterns match
# other ids; these and `%` itself are percent-encoded, so distinct ids give distinct tags. Other
# ids keep their form.
_TAG_RESERVED = re.compile(r"[%}*?\[\]\\]")


def _in_tag(person_id: str) -> str:
    return _TAG_RESERVED.sub(lambda m: f"%{ord(m.group()):02X}", person_id)


def person_keys_match(person_id: str) -> str:
    """The SCAN pattern that matches every per-person key of the person and no key of anyone else:
    every such key starts with the person's tag, whose closing brace no id can put inside it."""
    return f"{_person(person_id)}:*"


# ---------------------------------------------------------------- times as sorted-set scores

# The sorted sets scored by an event's time (session_recent, person_sessions, person_purchases,
# neighbour_session, item_sessions) hold whole microseconds since the epoch. Redis keeps a small sorted
# set as a listpack, where a whole score is stored as an integer but a fractional one as text it parses
# on every comparison, and a write walks the set: with fractional seconds those parses were ~15 % of the
# speed layer's Redis instructions on real clicks. Microseconds are an event time's own precision, and a
# double holds them exactly.
TIME_SCORE_PER_S = 1_000_000
# The key families (FAMILIES) of these sets.
TIME_SCORED_FAMILIES = frozenset(
    {"session_recent", "person_sessions", "person_purchases", "neighbour_sessions", "item_sessions"}
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def time_score(ts: datetime) -> int:
    """An event time (aware) as the score of the time-scored sorted sets: whole µs since the epoch,
    exactly (from the datetime itself, not through a timestamp's double)."""
    return (ts - _EPOCH) // _MICROSECOND


def score_seconds(score: float) -> float:
    """A time-scored sorted set's score as epoch seconds."""
    return score / TIME_SCORE_PER_S


# ---------------------------------------------------------------- slot groups (keys of no person)

# How many slot groups the global keys are spread over: the most Redis Cluster masters that share their
# load (a group is one slot). Changing it renames every global key: a one-time migration, not a setting.
SLOT_GROUPS = 16


def slot_group(key_id: str) -> int:
    """The slot group of a global key named by `key_id`: the first 32 bits of its SHA-1 mod SLOT_GROUPS.
    Lua computes the same from redis.sha1hex (speed_layer/apply_events.lua, common/read_state.lua)."""
    return int(hashlib.sha1(key_id.encode()).hexdigest()[:8], 16) % SLOT_GROUPS


def token_group(token: str) -> int:
    """The slot group of a session-kNN session key (`neighbour_session`): the token's own first 32 bits
    mod SLOT_GROUPS. A token is already a SHA-1's first 16 hex digits (`neighbours.session_token`), so
    hashing it again would spread nothing more, and the read script saves a SHA-1 for each of its ~300
    candidate sessions a read on real clicks. Lua computes the same (apply_events.lua, read_state.lua)."""
    return int(token[:8], 16) % SLOT_GROUPS


def _group(group: int) -> str:
    return f"{PREFIX}:{{g:{group}}}"


def _in_group(family: str, key_id: str) -> str:
    return f"{_group(slot_group(key_id))}:{family}:{key_id}"


_GROUP_TAG = re.compile(r"\{g:(\d+)\}")
# Keys read or written together share one group: a fixed one, named by what they hold.
_TREND_GROUP = _group(slot_group("trend"))
_ITEM_FLAGS_GROUP = _group(slot_group("item-flags"))
_SPEED_GROUP = _group(slot_group("speed"))
_BANDIT_GROUP = _group(slot_group("bandit"))
_DRIFT_GROUP = _group(slot_group("drift"))


def group_of_key(key: str) -> int | None:
    """The slot group a key's tag names, or None for a key outside the groups."""
    found = _GROUP_TAG.search(key)
    return int(found[1]) if found and key.startswith(f"{PREFIX}:{{g:") else None


def group_seen(group: int) -> str:
    """Dedup markers of events' global effects in one slot group (sorted set `<event_id>` -> epoch s,
    Redis time), written atomically with them by apply_globals.lua where the global effects are applied
    per group (Redis Cluster); members older than speed.dedup_ttl_s are dropped on each write."""
    return f"{_group(group)}:seen"


# ---------------------------------------------------------------- streams


def stream(name: str = "events") -> str:
    return f"{PREFIX}:stream:{name}"


def dead_letter(name: str = "events") -> str:
    return f"{PREFIX}:stream:{name}:dead"


# ---------------------------------------------------------------- per person (one slot each)


def seen_events(person_id: str) -> str:
    """Dedup markers of the person's events (sorted set member -> the epoch s it was written, Redis
    time): `<event_id>` = the version-free effects were applied, `<event_id>:<model_version>` = the
    event is in that version's delta (see seen_field). Written atomically with the effects, keyed
    by neither the event's time (a retry may carry another `ts`) nor its device (identify moves the
    device's markers to the user with its state). Members older than speed.dedup_ttl_s are dropped
    on each write, and the key expires speed.dedup_ttl_s after its last write."""
    return f"{_person(person_id)}:seen"


def seen_field(event_id: str, model_version: str | None = None) -> str:
    """The member of seen_events that marks the event's version-free effects, or its delta in a version."""
    return event_id if model_version is None else f"{event_id}:{model_version}"


def global_plans(person_id: str) -> str:
    """Hash event_id -> the global effects the person's state gave the event (the session's earlier items
    it co-visits, whether it entered the session), where global effects are applied per slot group:
    kept as long as the event's marker in seen_events, so a retry after a crash between the person's
    script and the groups' scripts re-sends the same effects."""
    return f"{_person(person_id)}:plans"


def person_placeholder(person_id: str) -> str:
    """A key in the person's slot that nothing writes: it stands for a script's declared global KEYS
    where a cluster call may name only the person's slot (an absent key reads as empty)."""
    return f"{_person(person_id)}:none"


def session_recent(person_id: str, session_id: str) -> str:
    """Sorted set item -> last event time in the session (`time_score`)."""
    return f"{_person(person_id)}:s:{session_id}:recent"


def session_categories(person_id: str, session_id: str) -> str:
    """Hash category -> weight·2^((ts − _t0)/half-life) summed (forward decay), plus `_t0` its reference time."""
    return f"{_person(person_id)}:s:{session_id}:cats"


def session_cart(person_id: str, session_id: str) -> str:
    """Hash item -> quantity in the cart."""
    return f"{_person(person_id)}:s:{session_id}:cart"


def session_counts(person_id: str, session_id: str) -> str:
    """Hash event_type -> count in the session."""
    return f"{_person(person_id)}:s:{session_id}:counts"


def session_arms(person_id: str, session_id: str) -> str:
    """Hash `<experiment>:<version>:<context>` -> the bandit arm the person was given in the session, so
    it stays theirs (serving writes it, with the session TTL)."""
    return f"{_person(person_id)}:s:{session_id}:arms"


def session_clicked(person_id: str, session_id: str) -> str:
    """String: the served-list record (bandit_served's value) of the session's last clicked list whose
    purchase reward is still open; the speed layer sets it on the click and takes it on a purchase. On
    Redis Cluster instead the bandit_served keys of the lists the session clicked since its last purchase,
    newest first, one a line (apply_events.lua `claim_rewards`); an entry an identify merged in from the
    device's session carries, after a tab, the device session's token, which took that list
    (merge_identity.lua)."""
    return f"{_person(person_id)}:s:{session_id}:clicked"


def person_sessions(person_id: str) -> str:
    """Sorted set session_id -> last activity (`time_score`): live sessions, for identify-merge and the reader."""
    return f"{_person(person_id)}:sessions"


def person_items(person_id: str) -> str:
    """Hash item -> accumulated implicit weight (features.implicit_weight); input to the fold-in.

    Version-free (kept speed.history_ttl_s): a person without a batch vector in whichever version
    serves is folded in from everything they engaged with."""
    return f"{_person(person_id)}:items"


def person_purchases(person_id: str) -> str:
    """Sorted set item -> time of last purchase (`time_score`), for the 'recently bought' rule."""
    return f"{_person(person_id)}:purchases"


def user_delta(person_id: str, model_version: str) -> str:
    """float32 bytes (k little-endian floats): the streaming SGD delta to the batch vector of `model_version`."""
    return f"{_person(person_id)}:delta:{model_version}"


def user_event_count(person_id: str, model_version: str) -> str:
    """Integer: how many events the delta of this version holds; also its compare-and-set version."""
    return f"{_person(person_id)}:delta:{model_version}:n"


def alias(anonymous_id: str) -> str:
    """String user_id once the device has logged in (identify); kept speed.history_ttl_s."""
    return f"{PREFIX}:alias:{anonymous_id}"


def identify_stash(person_id: str, event_id: str) -> str:
    """Hash part -> DUMP payload: the state of a device that an identify (event_id) moves into its user's,
    detached from the device's keys by the merge's first step where the two persons' slots differ (Redis
    Cluster; speed_layer/detach_device.lua names the parts); also that step's marker. Deleted once the
    merge is done, else it expires after speed.dedup_ttl_s."""
    return f"{_person(person_id)}:detached:{event_id}"


def identify_scratch(person_id: str, part: str) -> str:
    """A device's key (`part`, as identify_stash names it) restored into its user's slot by the merge's
    second step (merge_identity.lua on Redis Cluster), merged and deleted within that one script call."""
    return f"{_person(person_id)}:merging:{part}"


def person_devices(user_id: str) -> str:
    """Sorted set device -> when it last identified as the user (epoch s, Redis time): the reverse of
    alias(device), so erasure can find the user's devices. Written with the alias by the identify merge;
    members older than speed.history_ttl_s are dropped on each write and the key expires with them,
    as the aliases do."""
    return f"{_person(user_id)}:devices"


def erased(erased_id: str) -> str:
    """Tombstone of an erased person or device (value: the erasure's epoch s), kept speed.erased_ttl_s:
    the speed layer and the lake writer drop every event naming the id meanwhile, so nothing of the
    person is recreated. Named by a digest of the id (ids.id_digest), so no key names an erased id;
    outside the person's hash tag, as it outlives their keys."""
    return f"{PREFIX}:erased:{id_digest(erased_id)}"


def consent_withdrawal(withdrawn_id: str) -> str:
    """The latest consent withdrawal of a person or device through the API (common/consent.py): "<state>
    <epoch s>", kept speed.erased_ttl_s; the events naming the id received before it are applied as if
    sent with that state. Named by a digest of the id, like the tombstone, and outside the person's hash
    tag, as it outlives the keys the withdrawal deletes (so not a key of the person's: no `person_id`)."""
    return f"{PREFIX}:consent:{id_digest(withdrawn_id)}"


# Dedup markers (as seen_events) of the events applied without personalisation consent: they update
# aggregates only, so no key of the person may hold them. Members are event ids, linked to no one.
SEEN_UNLINKED = f"{PREFIX}:seen:unlinked"


def get_many(client: redis.Redis, keys: Sequence[str]) -> list[bytes | None]:
    """MGET, also where the keys live in several slots of a Redis Cluster (then one GET a key, per node)."""
    if is_cluster(client):
        return cast(list[bytes | None], client.mget_nonatomic(keys))  # type: ignore[attr-defined]
    return cast(list[bytes | None], client.mget(keys))


def erased_among(client: redis.Redis, ids: Collection[str]) -> set[str]:
    """The ids among `ids` that carry a tombstone (`erased`)."""
    ordered = sorted(set(ids))
    if not ordered:
        return set()
    return {i for i, tomb in zip(ordered, get_many(client, [erased(i) for i in ordered]), strict=True) if tomb}


@dataclass(frozen=True)
class Holdings:
    """What Redis holds of one person: `ids`, the person then the devices linked to them, and `keys`,
    every existing key that holds one of those ids."""

    ids: tuple[str, ...]
    keys: frozenset[bytes]


def holdings(client: redis.Redis, person_id: str) -> Holdings:
    """The one list of the keys that hold a person and their devices (erasure and tests use it): every
    key under the tag of the person and of each linked device, the devices' aliases, and the
    session-kNN sets of the sessions named there. A device whose alias now names another user is that
    user's, and left out."""
    ids = person_and_devices(client, person_id)
    tagged: set[bytes] = set()
    for person in ids:
        tagged |= set(client.scan_iter(match=person_keys_match(person), count=1000))
    sessions = _sessions_named(tagged, ids)
    named = [alias(p) for p in ids] + [neighbour_session(session_token(p, s)) for p in ids for s in sessions]
    pipe = client.pipeline(transaction=False)
    for key in named:
        pipe.exists(key)
    present = {key.encode() for key, found in zip(named, pipe.execute(), strict=True) if found}
    return Holdings(ids, frozenset(tagged | present))


def person_and_devices(client: redis.Redis, person_id: str) -> tuple[str, ...]:
    """The person, then the devices in their reverse index (person_devices) whose alias still names
    them or has expired."""
    members = cast(list[bytes], client.zrange(person_devices(person_id), 0, -1))  # clients answer bytes
    devices = [d.decode() for d in members]
    if not devices:
        return (person_id,)
    owners = get_many(client, [alias(d) for d in devices])
    mine = [d for d, owner in zip(devices, owners, strict=True) if owner is None or owner.decode() == person_id]
    return (person_id, *mine)


def _sessions_named(keys: set[bytes], persons: tuple[str, ...]) -> set[str]:
    """The session ids named by the persons' session-recent keys among `keys` (a device's pre-login
    session carries on under the user, so every person is paired with every session found)."""
    names = [k.decode(errors="replace") for k in keys]
    out: set[str] = set()
    for person in persons:
        prefix, suffix = template(session_recent, person)
        out |= {n[len(prefix) : len(n) - len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)}
    return out


# ---------------------------------------------------------------- global counters


def trending_bucket(bucket_start_s: int) -> str:
    """Sorted set item -> implicit-weighted count in one bucket of speed.trending_bucket_s, keyed by its start
    (event time); expires when it leaves speed.trending_window_s."""
    return f"{_TREND_GROUP}:trend:{bucket_start_s}"


def trending_bucket_start(key: str) -> int:
    """The start of the bucket `trending_bucket` named `key`."""
    return int(key.rsplit(":", 1)[1])


def popularity_day(day_index: int) -> str:
    """Sorted set item -> count of item events (events.ITEM_EVENTS but ATTENTION_EVENTS) by event time `ts` on one UTC day
    (features.day_index); kept 8 days."""
    return _in_group("pop", str(day_index))


def category_bestsellers(category: str) -> str:
    """Sorted set item -> purchase (and cart) weight within a category, forward-decayed: each event adds
    w·2^((ts − 2024-01-01)/speed.bestsellers_half_life_s) (speed_state.forward_decay), so scores
    compare directly at any moment; trimmed to speed.bestsellers_top_n."""
    return _in_group("catbest", category)


def covisitation(item_id: str) -> str:
    """Hash other item -> ordered co-visits within sessions (a pair counts when an item first enters a
    session's recent items), in whole units of common.sequence.FOLLOW_UNIT (read them with
    `follow_weights`); cut to its speed.covis_top_n heaviest once it holds twice as many.

    A hash, not a sorted set: an increment replaces a number in place, where a sorted set kept as a
    listpack also moves the member to its new rank (~5 % of the speed layer's Redis instructions an
    event in a row), and a reply gives whole numbers as stored, where a sorted set's scores are printed
    as doubles (~13 % of Redis' instructions a request). Readers take the heaviest themselves
    (`common.sequence.heaviest`, ties by member descending)."""
    return _in_group("followers", item_id)


def sorted_covisitation(item_id: str) -> str:
    """Where earlier versions kept an item's co-visits, as a sorted set of the same units: the speed layer
    converts and deletes these (speed_layer/migrations.py)."""
    return _in_group("follows", item_id)


def float_covisitation(item_id: str) -> str:
    """Where versions before FOLLOW_UNIT kept an item's co-visits, as float weights: the speed layer
    converts these into `sorted_covisitation` rows, and those into `covisitation` ones."""
    return _in_group("covis", item_id)


def neighbour_session(token: str) -> str:
    """Sorted set item -> time (`time_score`) it entered one past or live session (`neighbours.session_token`),
    the session as a neighbour candidate for session-kNN; its speed.recent_items newest items, kept
    speed.neighbour_session_ttl_s after its last new item. Pseudonymous: no person id in the name.
    Grouped by `token_group`, not `slot_group` (before, see `slot_grouped_neighbour_session`)."""
    return f"{_group(token_group(token))}:nb:s:{token}"


def slot_grouped_neighbour_session(token: str) -> str:
    """Where versions before `token_group` kept a session's neighbour set: the speed layer moves these
    (speed_layer/migrations.py)."""
    return _in_group("nb:s", token)


def item_sessions(item_id: str) -> str:
    """Sorted set session token -> time (`time_score`) the session took the item: the item's most recent
    sessions (speed.neighbour_sessions_per_item, trimmed when twice as many), for session-kNN."""
    return _in_group("nb:i", item_id)


def item_state(item_id: str) -> str:
    """Hash of the live item fields that change at once (catalog_state.apply_item_updates): price,
    in_stock ("1"/"0"), promoted ("1"/"0"), category, title, brand."""
    return _in_group("item", item_id)


def bandit_counts(experiment: str, version: str) -> str:
    """Hash bandit.count_field(context, arm, n|click|purchase) -> count: served lists and their rewards,
    the Beta posteriors of one experiment's arm set (version: bandit.experiment_version). The speed layer
    writes it; it expires experiments.posterior_ttl_s after the last impression counted. In the bandit's
    fixed group, with BANDIT_IMPRESSIONS: count_impressions.lua acknowledges and counts in one call."""
    return f"{_BANDIT_GROUP}:bandit:{experiment}:{version}:counts"


def bandit_served(request_id: str) -> str:
    """String "<counts key>\\n<click field>\\n<purchase field>": where a served list's rewards are counted,
    written by serving in bandit mode with the session TTL; the speed layer takes it on the list's first
    click (so a list is rewarded once). Names no person. In the bandit's fixed group with the count hash,
    so on Redis Cluster a reward is one call there (apply_globals.lua); there the first click marks it
    with the clicking session's token ("\\n<token>") for the session TTL instead of taking it, and the
    session's purchase takes it."""
    return f"{_BANDIT_GROUP}:bandit:served:{request_id}"


# Stream of served lists in bandit mode (fields: counts key, served field), trimmed to about
# experiments.impressions_kept; the speed layer counts each entry once (acknowledged in the same script).
BANDIT_IMPRESSIONS = f"{_BANDIT_GROUP}:bandit:impressions"
BANDIT_GROUP = "bandit"

OUT_OF_STOCK = f"{_ITEM_FLAGS_GROUP}:items:out_of_stock"  # set of item ids
PROMOTED = f"{_ITEM_FLAGS_GROUP}:items:promoted"  # set of item ids
# A fresh random token written after each change of the two sets: a reader holding a copy of both gets
# them again only when it changed (common/read_flags.lua).
ITEM_FLAGS_TOKEN = f"{_ITEM_FLAGS_GROUP}:items:flags_token"

# ---------------------------------------------------------------- speed layer bookkeeping

SPEED_VERSION = f"{_SPEED_GROUP}:speed:version"  # model version whose deltas the speed layer now serves
SPEED_PENDING_VERSION = f"{_SPEED_GROUP}:speed:pending"  # version being rebuilt: consumers write its deltas too
TRENDING_TOP = f"{_TREND_GROUP}:trend:top"  # sorted set item -> decayed sum of the window's buckets, re-summed often
# A fresh random text written with each TRENDING_TOP, in its transaction: readers keep a copy while it holds
TRENDING_TOP_TOKEN = f"{_TREND_GROUP}:trend:top_token"
# sorted set trending bucket key -> events counted in it, by the scripts that count them (speed_layer/trending.py)
TRENDING_VERSIONS = f"{_TREND_GROUP}:trend:versions"
TRENDING_REFRESH_LOCK = f"{_TREND_GROUP}:trend:lock"  # SET NX PX: one consumer re-sums the buckets at a time
SPEED_HEARTBEAT = f"{_SPEED_GROUP}:speed:heartbeat"  # hash consumer -> last beat (epoch ms)
SPEED_MIGRATED = f"{_SPEED_GROUP}:speed:migrated"  # set: the keyspace migrations done (speed_layer/migrations.py)


def speed_rebuild_lock(model_version: str) -> str:
    """SET NX with a TTL: the one consumer that replays the events after the version's cutoff."""
    return f"{_SPEED_GROUP}:speed:rebuilding:{model_version}"


def speed_rebuild_marker(model_version: str) -> str:
    """Set when the deltas of `model_version` have been rebuilt from its cutoff."""
    return f"{_SPEED_GROUP}:speed:rebuilt:{model_version}"


# ---------------------------------------------------------------- drift monitoring

# Stream of sampled served pools (common/drift.py), capped at drift.sample_requests entries: one global key
# written by every API worker at the sample rate, read by `recs drift report`; in its own fixed group.
DRIFT_SAMPLE = f"{_DRIFT_GROUP}:drift:sample"


def template(key_of: Callable[..., str], *fixed: str) -> list[str]:
    """[prefix, suffix] of the keys `key_of(*fixed, x)` around their last part x, for Lua scripts
    that build keys they only learn inside Redis (a session's items, its preferred categories)."""
    prefix, suffix = key_of(*fixed, _MARK).split(_MARK)
    return [prefix, suffix]


def grouped_template(key_of: Callable[..., str]) -> list[str]:
    """[head, middle, suffix] of the keys `key_of(x)` of a family tagged by x's slot group: the key is
    head .. slot_group(x) .. middle .. x .. suffix (Lua computes the group as slot_group does; for
    `neighbour_session`, as token_group does)."""
    head, rest = _GROUP_TAG.split(key_of(_MARK), maxsplit=1)[::2]
    middle, suffix = rest.split(_MARK)
    return [head + "{g:", "}" + middle, suffix]


def scan_grouped_ids(client: redis.Redis, key_of: Callable[[str], str]) -> Iterator[str]:
    """The id of every key of the slot-grouped family `key_of` in Redis (SCAN: every master of a cluster)."""
    head, middle, suffix = grouped_template(key_of)
    for key in client.scan_iter(match=_pattern(key_of), count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        yield name[name.index(middle, len(head)) + len(middle) : len(name) - len(suffix)]


# Never part of an id (a NUL); hex first, so that a session token's family (`token_group`) forms it too.
_MARK = "00000000\x00"


# ---------------------------------------------------------------- key families


@dataclass(frozen=True)
class KeyFamily:
    """One kind of key: its name, the SCAN patterns of its keys, and what it holds."""

    name: str
    patterns: tuple[str, ...]
    holds: str


def _pattern(key_of: Callable[..., str], arity: int = 1) -> str:
    """The glob of every key `key_of` forms: each argument replaced by `*` (the mark passes through the
    tag's escaping, which would turn a `*` argument into `%2A`)."""
    return _GROUP_TAG.sub("{g:*}", key_of(*[_MARK] * arity)).replace(_MARK, "*")


# Every key this module forms belongs to exactly one family: a key is counted in the first family that
# matches it, so a narrower pattern comes before a wider one that also matches (`:delta:V:n` before
# `:delta:V`, `trend:top` before `trend:<bucket>`). Erasure tombstones are named by a digest, hence the
# one written pattern.
FAMILIES: tuple[KeyFamily, ...] = (
    KeyFamily("stream_dead_letters", (_pattern(dead_letter),), "malformed entries with the reason"),
    KeyFamily("stream", (_pattern(stream),), "the accepted events, trimmed by age"),
    KeyFamily("seen", (_pattern(seen_events),), "per person: dedup markers of applied events"),
    KeyFamily("seen_unlinked", (SEEN_UNLINKED,), "dedup markers of events applied without personalisation"),
    KeyFamily("global_plans", (_pattern(global_plans),), "per person: applied events' global effects (cluster)"),
    KeyFamily("group_seen", (_pattern(group_seen),), "per slot group: dedup markers of global effects"),
    KeyFamily("person_sessions", (_pattern(person_sessions),), "per person: live sessions"),
    KeyFamily("session_recent", (_pattern(session_recent, 2),), "per session: recent items"),
    KeyFamily("session_categories", (_pattern(session_categories, 2),), "per session: category affinity"),
    KeyFamily("session_cart", (_pattern(session_cart, 2),), "per session: cart"),
    KeyFamily("session_counts", (_pattern(session_counts, 2),), "per session: counts by event type"),
    KeyFamily("session_arms", (_pattern(session_arms, 2),), "per session: the bandit arms given"),
    KeyFamily("session_clicked", (_pattern(session_clicked, 2),), "per session: a clicked list awaiting a purchase"),
    KeyFamily("person_items", (_pattern(person_items),), "per person: item weights for the fold-in"),
    KeyFamily("person_purchases", (_pattern(person_purchases),), "per person: recent purchases"),
    KeyFamily("delta_counts", (_pattern(user_event_count, 2),), "per user and version: events in the delta"),
    KeyFamily("deltas", (_pattern(user_delta, 2),), "per user and version: SGD delta to the batch vector"),
    KeyFamily("person_devices", (_pattern(person_devices),), "per user: devices that identified as them"),
    KeyFamily("identify_stash", (_pattern(identify_stash, 2),), "per device: state detached by an identify (cluster)"),
    KeyFamily("identify_scratch", (_pattern(identify_scratch, 2),), "per user: a device's key inside a merge (cluster)"),
    KeyFamily("aliases", (_pattern(alias),), "per device: the user it identified as"),
    KeyFamily("erased", (f"{PREFIX}:erased:*",), "tombstones of erased ids (digests)"),
    KeyFamily("consent_withdrawals", (f"{PREFIX}:consent:*",), "consent withdrawals by id (digests)"),
    KeyFamily(
        "trending_top",
        (TRENDING_TOP, TRENDING_TOP_TOKEN, TRENDING_REFRESH_LOCK, TRENDING_VERSIONS),
        "the materialised trending list, its token, its lock and the buckets' write counts",
    ),
    KeyFamily("trending_buckets", (_pattern(trending_bucket),), "per time bucket: weighted item counts"),
    KeyFamily("popularity_days", (_pattern(popularity_day),), "per day: item event counts"),
    KeyFamily("category_bestsellers", (_pattern(category_bestsellers),), "per category: best sellers"),
    KeyFamily("covisitation", (_pattern(covisitation),), "per item: ordered co-visits"),
    KeyFamily(
        "sorted_covisitation", (_pattern(sorted_covisitation),), "per item: earlier versions' co-visits, converted at start"
    ),
    KeyFamily(
        "float_covisitation", (_pattern(float_covisitation),), "per item: earlier versions' co-visits, converted at start"
    ),
    KeyFamily("neighbour_sessions", (_pattern(neighbour_session),), "per session: its items (session-kNN)"),
    KeyFamily("item_sessions", (_pattern(item_sessions),), "per item: its recent sessions (session-kNN)"),
    KeyFamily(
        "item_state", (_pattern(item_state), OUT_OF_STOCK, PROMOTED, ITEM_FLAGS_TOKEN), "live item fields and flags"
    ),
    KeyFamily("bandit_served", (_pattern(bandit_served),), "per served list (bandit mode): where its rewards go"),
    KeyFamily("bandit_impressions", (BANDIT_IMPRESSIONS,), "served lists (bandit mode) to count"),
    KeyFamily("bandit_counts", (_pattern(bandit_counts, 2),), "per experiment version: the arms' posteriors"),
    KeyFamily("drift_sample", (DRIFT_SAMPLE,), "sampled served pools: features, scores, categories"),
    KeyFamily(
        "speed_bookkeeping",
        (SPEED_VERSION, SPEED_PENDING_VERSION, SPEED_HEARTBEAT, SPEED_MIGRATED)
        + (_pattern(speed_rebuild_lock), _pattern(speed_rebuild_marker)),
        "served and pending version, heartbeats, migrations done, rebuild lock and marker",
    ),
)
OTHER_FAMILY = "other"  # a key of none of the families: formed outside this module


_FAMILY_MATCHERS = [
    (f.name, re.compile("|".join(fnmatch.translate(p) for p in f.patterns), re.DOTALL)) for f in FAMILIES
]


def family_of(key: bytes | str) -> str:
    """The name of the first family whose pattern matches the key, or OTHER_FAMILY."""
    name = key.decode(errors="surrogateescape") if isinstance(key, bytes) else key
    return next((family for family, matcher in _FAMILY_MATCHERS if matcher.match(name)), OTHER_FAMILY)
