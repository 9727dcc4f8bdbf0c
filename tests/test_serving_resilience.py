"""Degrade, never fail: Redis killed and back, no model yet, hot reload under load; impressions and attribution."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel, publish_synthetic_model
from common import redis_keys
from common.events import Event, EventType, events_to_table
from common.lake import Lake
from common.redis_server import RedisServer
from common.registry import publish_model_event
from common.stream import decode_entry
from serving.core.recommender import NO_MODEL, REDIS_DOWN
from serving.core.state import REDIS_RETRY_AFTER_S
from serving.main import create_app
from tests.test_serving_support import ids, make_settings, recs, serving_state, view_event

# The fixtures (model_template, published, client) live in the support module.
pytest_plugins = ["tests.test_serving_support"]


def test_redis_killed_mid_test_degrades_then_recovers(
    client: TestClient, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    healthy = recs(client, user_id="u1", k=10)
    assert healthy["degraded"] is None
    redis_server.kill()
    try:
        for _ in range(3):
            body = recs(client, user_id="u1", k=10)
            assert body["degraded"] == REDIS_DOWN
            assert len(body["items"]) == 10  # batch-only: ALS and batch popularity still serve
        assert client.get("/v1/items/i3/similar").json()["degraded"] == REDIS_DOWN
        assert client.get("/readyz").status_code == 503
        events = client.post("/v1/events", json=view_event("a", "i1"))
        assert events.status_code == 503 and "Retry-After" in events.headers
    finally:
        redis_server.start()
    time.sleep(REDIS_RETRY_AFTER_S + 0.1)
    assert recs(client, user_id="u1", k=10)["degraded"] is None
    assert client.get("/readyz").status_code == 200
    assert 'recs_fallbacks_total{reason="redis_unavailable"}' in client.get("/metrics").text


def test_no_model_serves_popular_items_from_the_lake(recs_env: Path, redis_client: redis.Redis) -> None:
    lake = Lake(str(recs_env / "lake"))
    now = datetime.now(UTC)
    events = [
        Event(
            event_id=f"00000000-0000-4000-8000-{n:012d}",
            event_type=EventType.VIEW,
            ts=now,
            received_at=now,
            anonymous_id=f"d{n}",
            item_id=item,
        )
        for n, item in enumerate(["hot"] * 5 + ["warm"] * 3 + ["cold"])
    ]
    lake.write_events(events_to_table(events))
    with TestClient(create_app(make_settings())) as test_client:
        body = recs(test_client, anonymous_id="first-visitor", k=3)
        assert body["model_version"] is None
        assert body["degraded"].startswith(NO_MODEL)
        assert ids(body) == ["hot", "warm", "cold"]
        assert test_client.get("/v1/items/hot/similar").status_code == 503


def test_hot_reload_under_concurrent_requests_loses_none(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    state = serving_state(client)
    publish_synthetic_model(state.registry, state.lake, version="v2", seed=21, activate=False)
    publish_synthetic_model(state.registry, state.lake, version="v3", seed=22, activate=False)
    failures: list[str] = []
    versions: dict[int, list[str]] = {n: [] for n in range(4)}  # each thread's answers, in order
    stop = threading.Event()

    def hammer(n: int) -> None:
        while not stop.is_set():
            response = client.get("/v1/recommendations", params={"user_id": f"u{n}", "k": 5})
            if response.status_code != 200 or len(response.json()["items"]) != 5:
                failures.append(response.text)
            else:
                versions[n].append(response.json()["model_version"])

    def until_every_thread_served(version: str) -> None:
        deadline = time.monotonic() + 30  # a wait, not a time asserted: the swaps go on under the load
        while not all(version in answers for answers in versions.values()):
            assert time.monotonic() < deadline and not failures, (version, failures[:1])
            time.sleep(0.05)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        until_every_thread_served("v1")
        # One swap through the admin call, one through the registry's pub/sub message.
        assert client.post("/v1/admin/models/v2/activate").status_code == 200
        until_every_thread_served("v2")
        event = state.registry.activate("v3", kind="published")
        assert publish_model_event(redis_client, event) >= 1
        until_every_thread_served("v3")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    # After its first answer from v3 a thread's every answer is v3: no request went back to an old version.
    assert all(answers[answers.index("v3") :] == ["v3"] * (len(answers) - answers.index("v3")) for answers in versions.values())


def test_impressions_land_in_the_lake_and_clicks_join_to_them(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    served = recs(client, user_id="u2", session_id="s-imp", k=5)
    clicked = served["items"][1]["item_id"]
    click = {**view_event("dev-2", clicked, session="s-imp"), "event_type": "click", "user_id": "u2"}
    click["rec_request_id"] = served["request_id"]
    assert client.post("/v1/events", json=click).status_code == 202

    state = serving_state(client)
    assert state.impressions.flush() >= 1  # the background flusher would do this within a second
    impressions = state.lake.read_impressions()
    row = impressions.filter(pa.compute.equal(impressions["request_id"], served["request_id"])).to_pylist()[0]
    assert row["items"] == ids(served) and row["variant"] == served["variant"]
    assert row["model_version"] == "v1" and row["user_id"] == "u2" and row["context"] == "home"

    # Play the lake writer: the click goes from the stream into the lake, then joins its impression.
    [(_, fields)] = redis_client.xrange(redis_keys.stream("events"))
    state.lake.write_events(events_to_table([decode_entry(fields)]))
    clicks = state.lake.read_events().select(["rec_request_id", "item_id"])  # noqa: F841 (read by duckdb)
    joined = duckdb.sql(
        "select c.item_id, i.variant, list_position(i.items, c.item_id) as position "
        "from clicks c join impressions i on c.rec_request_id = i.request_id"  # duckdb reads the locals
    ).fetchall()
    assert joined == [(clicked, served["variant"], 2)]  # list positions are 1-based


def test_impressions_buffered_at_shutdown_are_flushed(published: SyntheticModel, recs_env: Path) -> None:
    with TestClient(create_app(make_settings())) as test_client:
        served = [recs(test_client, user_id=f"u{n}")["request_id"] for n in range(3)]
    written = Lake(str(recs_env / "lake")).read_impressions()["request_id"].to_pylist()
    assert set(served) <= set(written)
