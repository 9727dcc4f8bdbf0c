"""Keyspace migrations the speed layer runs when a consumer starts: each converts, once, what an earlier
version wrote in a form this one no longer reads.

Each key is converted and deleted by one script call, so a crash, a retry or two consumers starting
together convert every key once. A migration is recorded in SPEED_MIGRATED once a whole pass finds
nothing left to convert (not after the pass that converted: a consumer of the earlier version still
running meanwhile may have written more), so later starts skip its SCAN of the whole keyspace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import redis

from common import redis_keys
from common.lua import load_script
from common.sequence import FOLLOW_UNIT

log = logging.getLogger(__name__)

CONVERT_COVISITS = load_script("speed_layer", "convert_covisits.lua")
CONVERT_TIMES = load_script("speed_layer", "convert_times.lua")
CONVERT_SORTED_COVISITS = load_script("speed_layer", "convert_sorted_covisits.lua")
COVISITS_IN_UNITS = "covisits-in-units"
COVISITS_AS_HASHES = "covisits-as-hashes"
NEIGHBOUR_SESSIONS_BY_TOKEN = "neighbour-sessions-by-token"
TIMES_IN_MICROSECONDS = "times-in-microseconds"
# A time-scored set's score under this is an earlier version's epoch seconds (convert_times.lua).
SECONDS_BELOW = 10**11


def run_migrations(client: redis.Redis, covis_kept: int, recent_kept: int) -> None:
    """Run the migrations not recorded as done."""
    migrations: dict[str, Callable[[], int]] = {
        COVISITS_IN_UNITS: lambda: convert_float_covisits(client, covis_kept),
        COVISITS_AS_HASHES: lambda: convert_sorted_covisits(client),  # after the one above: it writes sorted sets
        NEIGHBOUR_SESSIONS_BY_TOKEN: lambda: regroup_neighbour_sessions(client, recent_kept),
        TIMES_IN_MICROSECONDS: lambda: convert_second_times(client),
    }
    for name, migrate in migrations.items():
        if client.sismember(redis_keys.SPEED_MIGRATED, name):
            continue
        converted = migrate()
        if converted:
            log.info("%s: converted %d keys an earlier version wrote", name, converted)
        else:
            client.sadd(redis_keys.SPEED_MIGRATED, name)


def convert_float_covisits(client: redis.Redis, covis_kept: int) -> int:
    """Move every item's co-visits of float weights (`float_covisitation`) into its sorted set of units
    (`sorted_covisitation`, which `convert_sorted_covisits` moves on); returns how many rows were converted."""
    convert = client.register_script(CONVERT_COVISITS.source)
    rows = 0
    for item in redis_keys.scan_grouped_ids(client, redis_keys.float_covisitation):
        keys = [redis_keys.float_covisitation(item), redis_keys.sorted_covisitation(item)]
        args = [FOLLOW_UNIT, covis_kept]
        CONVERT_COVISITS.check(keys, args)
        rows += int(convert(keys=keys, args=args)) > 0
    return rows


def convert_sorted_covisits(client: redis.Redis) -> int:
    """Move every item's co-visits kept as a sorted set (`sorted_covisitation`) into its hash
    (`covisitation`); returns how many rows moved."""
    convert = client.register_script(CONVERT_SORTED_COVISITS.source)
    rows = 0
    for item in redis_keys.scan_grouped_ids(client, redis_keys.sorted_covisitation):
        keys = [redis_keys.sorted_covisitation(item), redis_keys.covisitation(item)]
        CONVERT_SORTED_COVISITS.check(keys, [])
        rows += int(convert(keys=keys)) > 0
    return rows


def regroup_neighbour_sessions(client: redis.Redis, recent_kept: int) -> int:
    """Move each session-kNN session set from its `slot_grouped_neighbour_session` key to its
    `neighbour_session` one; returns how many moved.

    The two keys are in different slots on a cluster, so no script holds both: the move merges into
    the new key (a later time wins, the `recent_kept` newest kept, as the event script trims) and
    only then deletes the old one, so a crash between the two leaves a merge that the next pass
    repeats with the same result.
    """
    moved = 0
    for token in set(redis_keys.scan_grouped_ids(client, redis_keys.neighbour_session)):
        old, new = redis_keys.slot_grouped_neighbour_session(token), redis_keys.neighbour_session(token)
        if old == new:
            continue
        items = cast(list[tuple[bytes, float]], client.zrange(old, 0, -1, withscores=True))
        if not items:
            continue
        ttl_ms = client.pttl(old)
        client.zadd(new, {member.decode(): at for member, at in items}, gt=True)
        client.zremrangebyrank(new, 0, -(recent_kept + 1))
        if ttl_ms > 0 and client.pttl(new) < ttl_ms:  # the later expiry of the two (-1: none yet)
            client.pexpire(new, ttl_ms)
        client.delete(old)
        moved += 1
    return moved


def convert_second_times(client: redis.Redis) -> int:
    """Rescore the members of every time-scored sorted set (redis_keys.TIME_SCORED_FAMILIES) that an
    earlier version scored in epoch seconds into `redis_keys.time_score`'s microseconds; returns how many
    sets had some. One script call a set, so a member is converted once whoever runs the pass."""
    convert = client.register_script(CONVERT_TIMES.source)
    args = [redis_keys.TIME_SCORE_PER_S, SECONDS_BELOW]
    converted = 0
    for family in redis_keys.FAMILIES:
        if family.name not in redis_keys.TIME_SCORED_FAMILIES:
            continue
        for pattern in family.patterns:
            for found in client.scan_iter(match=pattern, count=1000):
                key = found.decode() if isinstance(found, bytes) else str(found)
                if redis_keys.family_of(key) == family.name:  # not a narrower family's key the glob also matches
                    CONVERT_TIMES.check([key], args)
                    converted += int(convert(keys=[key], args=args)) > 0
    return converted
