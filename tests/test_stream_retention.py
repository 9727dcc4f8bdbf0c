"""The stream is trimmed by age where events are appended, never below what a consumer group still needs (real
Redis); the API's appends trim at most once a second per worker."""

from __future__ import annotations

import time

import redis
from fastapi.testclient import TestClient

from common import redis_keys
from common.settings import RedisSettings
from common.stream import FIELD, append_events
from serving.core.state import StreamTrimSchedule
from tests.speed_factories import make_event
from tests.test_serving_support import serving_state, view_event

pytest_plugins = ["tests.test_serving_support"]

STREAM = "events"
KEY = redis_keys.stream(STREAM)
RETENTION_MS = RedisSettings().stream_retention_ms
DAY_MS = 86_400_000


def add_at(client: redis.Redis, first_ms: int, n: int) -> list[bytes]:
    """n entries with ids from `first_ms` on (an event's JSON in each, as the API writes them)."""
    body = make_event().model_dump_json(exclude_none=True)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(KEY, {FIELD: body}, id=f"{first_ms + i}-0")
    return [entry_id if isinstance(entry_id, bytes) else entry_id.encode() for entry_id in pipe.execute()]


def read_all(client: redis.Redis, group: str) -> list[bytes]:
    [[_, entries]] = client.xreadgroup(group, "c1", {KEY: ">"}, count=100_000)
    return [entry_id for entry_id, _ in entries]


def remaining(client: redis.Redis) -> set[bytes]:
    return {entry_id for entry_id, _ in client.xrange(KEY)}


def now_ms() -> int:
    return int(time.time() * 1000)


def test_old_acknowledged_entries_go_and_pending_ones_stay(redis_client: redis.Redis) -> None:
    for group in ("speed", "lake-writer"):
        redis_client.xgroup_create(KEY, group, id="0", mkstream=True)
    old = add_at(redis_client, now_ms() - 3 * DAY_MS, 1000)
    redis_client.xack(KEY, "speed", *read_all(redis_client, "speed"))
    delivered = read_all(redis_client, "lake-writer")
    redis_client.xack(KEY, "lake-writer", *delivered[:600])  # the last 400 stay pending, 3 days old

    [fresh] = append_events(redis_client, [make_event()], STREAM, RETENTION_MS)

    kept = remaining(redis_client)
    assert set(old[600:]) <= kept and fresh.encode() in kept
    # Approximate trimming frees whole nodes of the radix tree: most, not all, of the finished entries.
    assert len(kept & set(old[:600])) < 200


def test_undelivered_entries_stay_whatever_their_age(redis_client: redis.Redis) -> None:
    redis_client.xgroup_create(KEY, "speed", id="0", mkstream=True)
    redis_client.xgroup_create(KEY, "lake-writer", id="0", mkstream=True)
    old = add_at(redis_client, now_ms() - 30 * DAY_MS, 1000)
    redis_client.xack(KEY, "speed", *read_all(redis_client, "speed"))  # the lake writer has read nothing

    append_events(redis_client, [make_event()], STREAM, RETENTION_MS)

    assert set(old) <= remaining(redis_client)


def test_entries_within_retention_stay_when_every_group_is_done(redis_client: redis.Redis) -> None:
    redis_client.xgroup_create(KEY, "speed", id="0", mkstream=True)
    recent = add_at(redis_client, now_ms() - RETENTION_MS + 3_600_000, 1000)  # an hour inside the window
    redis_client.xack(KEY, "speed", *read_all(redis_client, "speed"))

    append_events(redis_client, [make_event()], STREAM, RETENTION_MS)

    assert set(recent) <= remaining(redis_client)


def test_without_groups_age_alone_decides(redis_client: redis.Redis) -> None:
    old = add_at(redis_client, now_ms() - 3 * DAY_MS, 1000)
    recent = add_at(redis_client, now_ms() - DAY_MS, 10)

    append_events(redis_client, [make_event()], STREAM, RETENTION_MS)

    kept = remaining(redis_client)
    assert set(recent) <= kept and len(kept & set(old)) < 200


def test_appending_without_trim_keeps_old_entries(redis_client: redis.Redis) -> None:
    old = add_at(redis_client, now_ms() - 3 * DAY_MS, 1000)

    [fresh] = append_events(redis_client, [make_event()], STREAM, RETENTION_MS, trim=False)

    assert remaining(redis_client) == {*old, fresh.encode()}


def test_a_trim_schedule_is_due_once_an_interval() -> None:
    schedule = StreamTrimSchedule(interval_s=1.0)  # not due twice within a second, even on a loaded machine
    assert schedule.due()  # a worker's first append trims
    assert not schedule.due()
    time.sleep(1.05)
    assert schedule.due()
    assert not schedule.due()


def test_the_api_trims_where_it_appends_when_its_schedule_says(client: TestClient, redis_client: redis.Redis) -> None:
    """Each worker's POST /v1/events runs the trim script only when its schedule is due, not on every append."""

    def posted(n: int) -> dict[str, int]:
        redis_client.config_resetstat()
        for i in range(n):
            response = client.post("/v1/events", json=view_event("u1", f"i{i}"))
            assert response.status_code == 202, response.text
        stats = redis_client.info("commandstats")
        return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("xadd", "xtrim")}

    state = serving_state(client)
    state.stream_trim = StreamTrimSchedule(interval_s=3600)
    assert posted(3) == {"xadd": 3, "xtrim": 1}
    state.stream_trim = StreamTrimSchedule(interval_s=0)
    assert posted(2) == {"xadd": 2, "xtrim": 2}
