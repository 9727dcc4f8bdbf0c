"""Erasure as a contract, on a real redis-server through the real API, speed consumer and lake writer:
nothing of the user or their devices is left in Redis or the stream, nothing comes back, and their
batch factors stay unused until a version trained after the erasure serves."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from fastapi.testclient import TestClient

from bench.serve import publish_synthetic_model
from common import redis_keys
from common.lake import Lake
from common.model import load_model
from serving.main import create_app
from spark_jobs import pipeline
from spark_jobs.erasure import apply_erasures
from spark_jobs.plan import work_root
from speed_layer.consumer import SpeedConsumer
from speed_layer.lake_writer import LakeWriter
from tests.test_serving_support import make_settings, recs, serving_state, view_event
from warehouse.build import refresh_warehouse
from warehouse.query import open_read_only

pytest_plugins = ["tests.test_serving_support"]

USER = "u37"  # has a batch vector in the published model, so their events build an SGD delta
DEVICE = "dev-erase-37"
OTHER = "dev-keep"  # someone else, whose state must survive


def naming(client: redis.Redis, ids: list[str]) -> list[str]:
    """Every key, and every value, member or stream entry of any key, that holds one of the ids."""
    needles = [i.encode() for i in ids]
    found = []
    for key in client.scan_iter(count=1000):
        for part in [key, *_contents(client, key)]:
            if any(n in part for n in needles):
                found.append(f"{key.decode()}: {part[:100]!r}")
    return found


def _contents(client: redis.Redis, key: bytes) -> list[bytes]:
    kind = client.type(key).decode()
    if kind == "string":
        return [client.get(key) or b""]
    if kind == "hash":
        return [part for pair in client.hgetall(key).items() for part in pair]
    if kind == "zset":
        return list(client.zrange(key, 0, -1))
    if kind == "set":
        return list(client.smembers(key))
    if kind == "stream":
        return [value for _, fields in client.xrange(key) for value in fields.values()]
    return list(client.lrange(key, 0, -1))


def post(client: TestClient, *events: dict[str, Any]) -> None:
    response = client.post("/v1/events", json=list(events))
    assert response.status_code == 202, response.text


def drain(consumer: SpeedConsumer) -> None:
    while consumer.poll_once(block=False):
        pass


def test_erasure_leaves_nothing_of_the_user_and_their_device_and_nothing_comes_back(
    client: TestClient, redis_client: redis.Redis
) -> None:
    settings = serving_state(client).settings
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    drain(consumer)  # switches the speed layer to the published version, so the user's events build a delta
    post(client, view_event(DEVICE, "i5"), {**view_event(DEVICE, "i13"), "event_type": "add_to_cart"})
    drain(consumer)
    post(client, {**view_event(DEVICE, "i5"), "event_type": "identify", "item_id": None, "user_id": USER})
    drain(consumer)
    post(client, view_event(DEVICE, "i21", user_id=USER), view_event(OTHER, "i5", session="s9"))
    drain(consumer)
    version = redis_client.get(redis_keys.SPEED_VERSION).decode()
    assert redis_client.exists(redis_keys.user_delta(USER, version), redis_keys.alias(DEVICE)) == 2
    others = set(redis_client.keys(redis_keys.person_keys_match(OTHER)))
    assert others and naming(redis_client, [USER]) and naming(redis_client, [DEVICE])

    response = client.delete(f"/v1/users/{USER}")
    assert response.status_code == 200, response.text

    assert naming(redis_client, [USER, DEVICE]) == []  # keys, aliases, markers, stream entries, dead letters
    assert set(redis_client.keys(redis_keys.person_keys_match(OTHER))) == others
    assert redis_keys.holdings(redis_client, USER).keys == frozenset()
    body = response.json()
    assert body["devices_erased"] == 1 and body["stream_entries_deleted"] == 4

    # The device comes back, anonymous: its events are dropped, by the speed layer and the lake writer.
    post(client, view_event(DEVICE, "i29", session="s2"))
    drain(consumer)
    stream = redis_keys.stream(settings.redis.stream)
    assert [hit.split(": ")[0] for hit in naming(redis_client, [USER, DEVICE])] == [stream]  # that entry alone
    assert not redis_client.exists(redis_keys.user_delta(USER, version))
    writer = LakeWriter(redis_client, settings, name="w1")
    assert writer.poll_once() == 2  # the other person's event and the device's new one
    writer.flush()
    events = Lake(settings.lake.root).read_events(columns=["anonymous_id", "user_id"]).to_pylist()
    assert {e["anonymous_id"] for e in events} == {OTHER}


def uses_batch_factors(client: TestClient, user: str) -> bool:
    return any("als" in item["sources"] for item in recs(client, user_id=user)["items"])


def uses_batch_history(client: TestClient, user: str) -> bool:
    """Whether the list holds an item of the version's history of the person (bench.serve.synthetic_history)."""
    return any("history" in item["sources"] for item in recs(client, user_id=user)["items"])


def test_erased_users_factors_stay_unused_until_a_version_trained_after_the_erasure_serves(
    client: TestClient,
) -> None:
    state = serving_state(client)
    assert uses_batch_factors(client, "u4") and uses_batch_history(client, "u4")
    assert client.delete("/v1/users/u4").status_code == 200
    assert not uses_batch_factors(client, "u4") and not uses_batch_history(client, "u4")

    apply_erasures(state.lake)  # the nightly step: the lake is rewritten and the queue cleared
    assert state.lake.pending_erasures() == []
    with TestClient(create_app(make_settings())) as restarted:  # a worker that never saw the request
        assert not uses_batch_factors(restarted, "u4")  # v1 was trained on their events
        assert not uses_batch_history(restarted, "u4")
        assert uses_batch_factors(restarted, "u5") and uses_batch_history(restarted, "u5")  # only theirs are hidden

        # A version trained after the erasure (its cutoff is later) serves them again, as anyone new to it.
        publish_synthetic_model(state.registry, state.lake, version="v2", activate=False)
        manifest = state.registry.read_manifest("v2")
        state.registry.write_manifest(manifest.model_copy(update={"cutoff": datetime.now(UTC)}))
        assert restarted.post("/v1/admin/models/v2/activate").status_code == 200
        assert recs(restarted, user_id="u4")["model_version"] == "v2"
        assert uses_batch_factors(restarted, "u4")


def test_after_the_nightly_erasure_no_store_holds_the_person(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """The audit: Redis and the stream, the lake (events and impressions), every model version, the
    batch runs' work files and every warehouse view hold nothing of the user or their device."""
    state = serving_state(client)
    settings = state.settings
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    post(client, view_event(DEVICE, "i5"), {**view_event(DEVICE, "i5"), "event_type": "identify",
                                            "item_id": None, "user_id": USER})  # fmt: skip
    post(client, view_event(DEVICE, "i21", user_id=USER), view_event(OTHER, "i5", session="s9"))
    drain(consumer)
    recs(client, user_id=USER)
    state.impressions.flush()
    writer = LakeWriter(redis_client, settings, name="w1")
    writer.poll_once()
    writer.flush()
    work_file = work_root(settings) / "20260101T000000Z-implicit" / "interactions" / "part-0.parquet"
    work_file.parent.mkdir(parents=True)
    work_file.write_text(USER)  # what a run's derived tables hold
    assert naming_in_lake(state.lake, [USER, DEVICE]) and USER in load_model(state.registry).user_ids

    assert client.delete(f"/v1/users/{USER}").status_code == 200
    report = pipeline.erase(settings)

    assert report["users"] == 1 and report["factor_rows_forgotten"] == 1
    assert naming(redis_client, [USER, DEVICE]) == []
    assert naming_in_lake(state.lake, [USER, DEVICE]) == []
    for version in state.registry.versions():
        state.registry.verify(version)  # the rewritten files match their manifest
        assert {USER, DEVICE}.isdisjoint(load_model(state.registry, version).user_ids)
    assert not work_root(settings).exists()
    assert naming_in_warehouse(refresh_warehouse(settings), [USER, DEVICE]) == []
    assert uses_batch_factors(client, "u5")  # and everyone else's stay


def naming_in_lake(lake: Lake, ids: list[str]) -> list[str]:
    """Every lake row (events, impressions) with a string column holding one of the ids."""
    found = []
    for name, table in (("events", lake.read_events()), ("impressions", lake.read_impressions())):
        for row in table.to_pylist():
            if any(i in str(value) for value in row.values() for i in ids):
                found.append(f"{name}: {row}")
    return found


def naming_in_warehouse(db_path: Path, ids: list[str]) -> list[str]:
    """Every row of every warehouse table or view whose text holds one of the ids."""
    con = open_read_only(db_path)
    found = []
    try:
        relations = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        for relation in relations:
            for row in con.execute(f'SELECT * FROM "{relation}"').fetchall():
                if any(i in str(value) for value in row for i in ids):
                    found.append(f"{relation}: {row}")
    finally:
        con.close()
    return found
