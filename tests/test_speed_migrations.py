"""The speed layer's start converts, once, what an earlier version kept in another form: co-visits as
float weights into units, co-visits in sorted sets into hashes, session-kNN session sets into their token's
slot group, times in seconds into microseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from common import redis_keys
from common.events import EventType
from common.neighbours import session_token
from common.redis_server import RedisServer
from common.registry import Registry
from common.sequence import FOLLOW_UNIT, follow_weights
from common.speed_state import NeighbourQuery, read_speed_state
from speed_layer.consumer import SpeedConsumer
from speed_layer.effects import Applier
from speed_layer.migrations import (
    COVISITS_AS_HASHES,
    COVISITS_IN_UNITS,
    NEIGHBOUR_SESSIONS_BY_TOKEN,
    TIMES_IN_MICROSECONDS,
)
from tests.speed_factories import make_event, speed_settings


def _units(client: redis.Redis, item: str) -> dict[str, int]:
    return {m.decode(): int(u) for m, u in client.hgetall(redis_keys.covisitation(item)).items()}


def _start(client: redis.Redis, url: str, tmp_path: Path, **speed: int) -> None:
    settings = speed_settings(tmp_path, url, **speed)
    SpeedConsumer(client, settings, Registry(settings.models.root), name="c1").warm_up()


def test_float_covisits_become_units_added_to_the_new_rows_and_the_old_rows_go(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """On a Redis Cluster too: the scan covers every master, and an item's old and new rows share a slot.
    The floats become a sorted set of units (what the version after them kept), which the next migration
    moves into the hash."""
    redis_client, url = any_redis
    # Sums of 1/g as an earlier version's script left them, and a row this version wrote meanwhile.
    redis_client.zadd(redis_keys.float_covisitation("a"), {"b": 1 + 1 / 3, "c": 0.5, "d": 1 / 7 + 1 / 9})
    redis_client.zadd(redis_keys.float_covisitation("odd}:item"), {"a": 1.0})
    redis_client.hset(redis_keys.covisitation("a"), "b", FOLLOW_UNIT)

    _start(redis_client, url, tmp_path)

    assert _units(redis_client, "a") == {"b": 2 * FOLLOW_UNIT + FOLLOW_UNIT // 3, "c": FOLLOW_UNIT // 2, "d": FOLLOW_UNIT // 7 + FOLLOW_UNIT // 9}
    assert follow_weights(*zip(*_units(redis_client, "odd}:item").items(), strict=True)) == {"a": 1.0}
    for item in ("a", "odd}:item"):
        assert not redis_client.exists(redis_keys.float_covisitation(item), redis_keys.sorted_covisitation(item))
    # A pass that converted is not the last: a consumer of the earlier version may still be writing.
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_IN_UNITS)
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_AS_HASHES)

    _start(redis_client, url, tmp_path)  # nothing left: recorded, and nothing counted twice
    assert redis_client.smismember(redis_keys.SPEED_MIGRATED, [COVISITS_IN_UNITS, COVISITS_AS_HASHES]) == [1, 1]
    assert _units(redis_client, "a")["b"] == 2 * FOLLOW_UNIT + FOLLOW_UNIT // 3

    redis_client.zadd(redis_keys.float_covisitation("late"), {"a": 1.0})
    _start(redis_client, url, tmp_path)  # recorded: later starts skip the keyspace scan
    assert redis_client.exists(redis_keys.float_covisitation("late"))


def test_a_converted_row_is_trimmed_as_the_event_script_trims_it(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.flushall()
    redis_client.zadd(redis_keys.float_covisitation("a"), {f"o{j}": 1 / (1 + j % 20) for j in range(30)})
    redis_client.zadd(redis_keys.sorted_covisitation("a"), {f"n{j}": FOLLOW_UNIT // 2 for j in range(5)})

    _start(redis_client, redis_server.url, tmp_path, covis_top_n=10)  # 35 followers: over twice the 10 kept

    row = _units(redis_client, "a")
    assert len(row) == 10
    # The 10 highest: 1, 1, seven of 1/2, then of the two at 1/3 the one Redis ranks higher (ties by member).
    assert set(row) == {"o0", "o20", "o1", "o21", "o22"} | {f"n{j}" for j in range(5)}


def test_sorted_covisits_move_into_the_hashes_added_to_what_this_version_wrote(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """On a Redis Cluster too. A reader of this version sees an unmoved row as empty, never an error."""
    redis_client, url = any_redis
    redis_client.zadd(redis_keys.sorted_covisitation("a"), {"b": FOLLOW_UNIT, "c": FOLLOW_UNIT // 2})
    redis_client.zadd(redis_keys.sorted_covisitation("odd}:item"), {"a": 3 * FOLLOW_UNIT})
    redis_client.hset(redis_keys.covisitation("a"), "b", FOLLOW_UNIT // 3)  # written since by this version
    assert read_speed_state(redis_client, "p", covis_items=["odd}:item"]).covisitation == {"odd}:item": {}}

    _start(redis_client, url, tmp_path)

    assert _units(redis_client, "a") == {"b": FOLLOW_UNIT + FOLLOW_UNIT // 3, "c": FOLLOW_UNIT // 2}
    assert read_speed_state(redis_client, "p", covis_items=["odd}:item"]).covisitation == {"odd}:item": {"a": 3.0}}
    assert not any(redis_client.exists(redis_keys.sorted_covisitation(item)) for item in ("a", "odd}:item"))
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_AS_HASHES)
    _start(redis_client, url, tmp_path)  # nothing left: recorded, and nothing moved twice
    assert redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_AS_HASHES)
    assert _units(redis_client, "a")["b"] == FOLLOW_UNIT + FOLLOW_UNIT // 3


def _moving_tokens(n: int) -> list[str]:
    """Session tokens whose neighbour set an earlier version kept in another group than this one does."""
    tokens = (session_token(f"p{j}", "s1") for j in range(1000))
    moving = (t for t in tokens if redis_keys.slot_grouped_neighbour_session(t) != redis_keys.neighbour_session(t))
    return [next(moving) for _ in range(n)]


def test_neighbour_sessions_move_to_their_token_group_merged_with_what_was_written_since(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """On a Redis Cluster too: the old and the new key are in different slots there."""
    redis_client, url = any_redis
    alone, written_since = _moving_tokens(2)
    t = redis_keys.time_score(datetime.now(UTC))  # times as this version keeps them: the move keeps them as they are
    redis_client.zadd(redis_keys.slot_grouped_neighbour_session(alone), {"a": t + 100, "b": t + 200})
    started = time.monotonic()
    redis_client.pexpire(redis_keys.slot_grouped_neighbour_session(alone), 50_000)
    redis_client.zadd(redis_keys.slot_grouped_neighbour_session(written_since), {f"o{j}": t + 100 + j for j in range(3)})
    redis_client.zadd(redis_keys.neighbour_session(written_since), {"o2": t + 50, "n": t + 300})
    redis_client.pexpire(redis_keys.neighbour_session(written_since), 90_000_000)

    _start(redis_client, url, tmp_path, recent_items=3)

    def held(token: str) -> dict[str, float]:
        return {m.decode(): s for m, s in redis_client.zrange(redis_keys.neighbour_session(token), 0, -1, withscores=True)}

    assert held(alone) == {"a": t + 100, "b": t + 200}
    spent_ms = (time.monotonic() - started) * 1000 + 1000  # since the expiry was set, and a second of slack
    assert 50_000 - spent_ms < redis_client.pttl(redis_keys.neighbour_session(alone)) <= 50_000  # its expiry moved with it
    # The 3 newest of the two (o2's later time wins), and the later of the two expiries.
    assert held(written_since) == {"o1": t + 101, "o2": t + 102, "n": t + 300}
    assert redis_client.pttl(redis_keys.neighbour_session(written_since)) > 50_000
    assert not any(redis_client.exists(redis_keys.slot_grouped_neighbour_session(t)) for t in (alone, written_since))
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, NEIGHBOUR_SESSIONS_BY_TOKEN)

    _start(redis_client, url, tmp_path, recent_items=3)  # nothing left: recorded
    assert redis_client.sismember(redis_keys.SPEED_MIGRATED, NEIGHBOUR_SESSIONS_BY_TOKEN)
    assert held(alone) == {"a": t + 100, "b": t + 200}


def test_a_moved_session_is_a_neighbour_again(any_redis: tuple[redis.Redis, str], tmp_path: Path) -> None:
    """A session an earlier version indexed votes for its items in this version's read, once moved."""
    redis_client, url = any_redis
    (earlier,) = _moving_tokens(1)
    now = datetime.now(UTC)
    redis_client.zadd(redis_keys.slot_grouped_neighbour_session(earlier), {"x": now.timestamp() - 60, "y": now.timestamp() - 50})
    redis_client.zadd(redis_keys.item_sessions("x"), {earlier: now.timestamp() - 60})
    settings = speed_settings(tmp_path, url)
    Applier(redis_client, settings).apply([make_event(EventType.VIEW, "x", anonymous_id="me", session_id="s1", ts=now)], [])
    query = NeighbourQuery(sample=500, k=100, n=10, per_item=100)

    def neighbours() -> list[str]:
        return [item for item, _ in read_speed_state(redis_client, "me", session_id="s1", neighbours=query).neighbours]

    assert neighbours() == []  # the read looks where this version keeps it
    _start(redis_client, url, tmp_path)
    assert neighbours() == ["y"]


def test_times_an_earlier_version_kept_in_seconds_become_microseconds(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """Every time-scored family, on one Redis and on a cluster; a member written since in microseconds
    and the keys of other families (dedup markers are scored in seconds of Redis' clock) stay as they are."""
    redis_client, url = any_redis
    token = session_token("p", "s1")
    in_seconds = {
        redis_keys.session_recent("p", "s1"): "i1",
        redis_keys.person_sessions("p"): "s1",
        redis_keys.person_purchases("p"): "i1",
        redis_keys.neighbour_session(token): "i1",
        redis_keys.item_sessions("i1"): token,
    }
    assert {redis_keys.family_of(key) for key in in_seconds} == redis_keys.TIME_SCORED_FAMILIES
    when = datetime.now(UTC).replace(microsecond=1000) - timedelta(hours=1)  # a store's import spaces lines by 1 ms
    for key, member in in_seconds.items():
        redis_client.zadd(key, {member: when.timestamp()})
    since = redis_keys.time_score(when + timedelta(seconds=5))
    redis_client.zadd(redis_keys.session_recent("p", "s1"), {"i2": since})
    redis_client.zadd(redis_keys.seen_events("p"), {"e1": 1_700_000_000})

    _start(redis_client, url, tmp_path)

    for key, member in in_seconds.items():
        assert redis_client.zscore(key, member) == redis_keys.time_score(when), key
    assert redis_client.zscore(redis_keys.session_recent("p", "s1"), "i2") == since
    assert redis_client.zscore(redis_keys.seen_events("p"), "e1") == 1_700_000_000
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, TIMES_IN_MICROSECONDS)
    _start(redis_client, url, tmp_path)  # nothing left: recorded
    assert redis_client.sismember(redis_keys.SPEED_MIGRATED, TIMES_IN_MICROSECONDS)

    # Serving reads them as the times they were: the purchase an hour ago is a recent one.
    state = read_speed_state(redis_client, "p", session_id="s1")
    assert state.purchases == {"i1": pytest.approx(when.timestamp(), abs=1e-6)}
    assert state.session_items == {"i1": pytest.approx(when.timestamp(), abs=1e-6), "i2": pytest.approx(when.timestamp() + 5, abs=1e-6)}
