"""The speed layer's start converts co-visits an earlier version kept as float weights into units, once."""

from __future__ import annotations

from pathlib import Path

import redis

from common import redis_keys
from common.redis_server import RedisServer
from common.registry import Registry
from common.sequence import FOLLOW_UNIT, follow_weights
from speed_layer.consumer import SpeedConsumer
from speed_layer.migrations import COVISITS_IN_UNITS
from tests.speed_factories import speed_settings


def _units(client: redis.Redis, item: str) -> dict[str, float]:
    return {m.decode(): s for m, s in client.zrange(redis_keys.covisitation(item), 0, -1, withscores=True)}


def _start(client: redis.Redis, url: str, tmp_path: Path, **speed: int) -> None:
    settings = speed_settings(tmp_path, url, **speed)
    SpeedConsumer(client, settings, Registry(settings.models.root), name="c1").warm_up()


def test_float_covisits_become_units_added_to_the_new_rows_and_the_old_rows_go(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """On a Redis Cluster too: the scan covers every master, and an item's old and new rows share a slot."""
    redis_client, url = any_redis
    # Sums of 1/g as an earlier version's script left them, and a row this version wrote meanwhile.
    redis_client.zadd(redis_keys.float_covisitation("a"), {"b": 1 + 1 / 3, "c": 0.5, "d": 1 / 7 + 1 / 9})
    redis_client.zadd(redis_keys.float_covisitation("odd}:item"), {"a": 1.0})
    redis_client.zadd(redis_keys.covisitation("a"), {"b": FOLLOW_UNIT})

    _start(redis_client, url, tmp_path)

    assert _units(redis_client, "a") == {"b": 2 * FOLLOW_UNIT + FOLLOW_UNIT // 3, "c": FOLLOW_UNIT // 2, "d": FOLLOW_UNIT // 7 + FOLLOW_UNIT // 9}
    assert follow_weights(_units(redis_client, "odd}:item").items()) == {"a": 1.0}
    assert not any(redis_client.exists(redis_keys.float_covisitation(item)) for item in ("a", "odd}:item"))
    # A pass that converted is not the last: a consumer of the earlier version may still be writing.
    assert not redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_IN_UNITS)

    _start(redis_client, url, tmp_path)  # nothing left: recorded, and nothing counted twice
    assert redis_client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_IN_UNITS)
    assert _units(redis_client, "a")["b"] == 2 * FOLLOW_UNIT + FOLLOW_UNIT // 3

    redis_client.zadd(redis_keys.float_covisitation("late"), {"a": 1.0})
    _start(redis_client, url, tmp_path)  # recorded: later starts skip the keyspace scan
    assert redis_client.exists(redis_keys.float_covisitation("late"))


def test_a_converted_row_is_trimmed_as_the_event_script_trims_it(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    redis_client.flushall()
    redis_client.zadd(redis_keys.float_covisitation("a"), {f"o{j}": 1 / (1 + j % 20) for j in range(30)})
    redis_client.zadd(redis_keys.covisitation("a"), {f"n{j}": FOLLOW_UNIT // 2 for j in range(5)})

    _start(redis_client, redis_server.url, tmp_path, covis_top_n=10)  # 35 followers: over twice the 10 kept

    row = _units(redis_client, "a")
    assert len(row) == 10
    # The 10 highest: 1, 1, seven of 1/2, then of the two at 1/3 the one Redis ranks higher (ties by member).
    assert set(row) == {"o0", "o20", "o1", "o21", "o22"} | {f"n{j}" for j in range(5)}
