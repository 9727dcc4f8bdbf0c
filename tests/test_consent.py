"""Consent as a contract, on a real redis-server through the real API, speed consumer and lake writer:
each state keeps what it allows and no more, a withdrawal erases what it no longer allows (events still
in the stream included), and a request without personalisation consent gets a non-personal list."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from fastapi.testclient import TestClient

from common import redis_keys
from common.features import day_index
from common.lake import Lake
from spark_jobs.erasure import apply_erasures
from speed_layer.consumer import SpeedConsumer
from speed_layer.lake_writer import LakeWriter
from tests.test_erasure import drain, naming, post
from tests.test_serving_support import recs, serving_state, view_event

pytest_plugins = ["tests.test_serving_support"]

# Users with a batch vector in the published model: their personalised events build an SGD delta.
PERSON_OF = {"none": "u30", "analytics": "u31", "personalisation": "u32"}


def shopping(user: str, consent: str, session: str = "s1") -> list[dict[str, Any]]:
    """A signed-in user's view, cart and purchase, from their own device, with the page's consent."""
    device = f"dev-{user}"
    return [
        view_event(device, "i5", session, user_id=user, consent=consent),
        {**view_event(device, "i13", session, user_id=user, consent=consent), "event_type": "add_to_cart"},
        {**view_event(device, "i13", session, user_id=user, consent=consent), "event_type": "purchase"},
    ]


def popularity(client: redis.Redis, item: str) -> float:
    return client.zscore(redis_keys.popularity_day(day_index(datetime.now(UTC).timestamp())), item) or 0.0


def lake_persons(lake: Lake) -> set[str]:
    return {e["anonymous_id"] for e in lake.read_events(columns=["anonymous_id"]).to_pylist()}


def land(writer: LakeWriter) -> None:
    writer.poll_once()  # one read holds every entry of these tests
    writer.flush()


def test_each_consent_state_keeps_what_it_allows(client: TestClient, redis_client: redis.Redis) -> None:
    settings = serving_state(client).settings
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    drain(consumer)  # switches the speed layer to the published version, so deltas are built
    for consent, user in PERSON_OF.items():
        login = {**view_event(f"dev-{user}", "i5", f"s-{consent}", consent=consent), "event_type": "identify"}
        post(client, {**login, "item_id": None, "user_id": user})  # links the device to the user
        post(client, *shopping(user, consent, session=f"s-{consent}"))
    drain(consumer)

    # Personalisation: sessions, history, purchases and a delta, as before consent existed.
    version = redis_client.get(redis_keys.SPEED_VERSION).decode()
    mine = PERSON_OF["personalisation"]
    assert redis_client.exists(
        redis_keys.user_delta(mine, version), redis_keys.person_items(mine), redis_keys.alias(f"dev-{mine}"),
        redis_keys.person_purchases(mine), redis_keys.session_recent(mine, "s-personalisation"),
    ) == 5  # fmt: skip
    # Below it: no key, member or value names the person, their device or their session (the stream
    # holds their entries until retention trims them, as it holds everyone's).
    stream = redis_keys.stream(settings.redis.stream)
    for consent in ("none", "analytics"):
        user = PERSON_OF[consent]
        found = naming(redis_client, [user, f"dev-{user}", f"s-{consent}"])
        assert {hit.split(": ")[0] for hit in found} == {stream}, found
        assert redis_keys.holdings(redis_client, user).keys == frozenset()
    # Aggregates count every event, once, whatever its consent: a redelivery changes nothing.
    assert (popularity(redis_client, "i5"), popularity(redis_client, "i13")) == (3, 6)
    consumer.process(redis_client.xrange(stream))
    assert (popularity(redis_client, "i5"), popularity(redis_client, "i13")) == (3, 6)

    # The lake holds the events with analytics consent, and nothing of those without.
    land(LakeWriter(redis_client, settings, name="w1"))
    lake = Lake(settings.lake.root)
    assert lake_persons(lake) == {"dev-u31", "dev-u32"}
    rows = lake.read_events(columns=["user_id", "consent"]).to_pylist()
    assert sorted({(r["user_id"], r["consent"]) for r in rows}) == [("u31", "analytics"), ("u32", "personalisation")]
    assert len(rows) == 8  # each one's identify and three events


def test_events_without_a_consent_keep_todays_behaviour(client: TestClient, redis_client: redis.Redis) -> None:
    settings = serving_state(client).settings
    post(client, view_event("dev-legacy", "i5"))  # a client from before the field
    drain(SpeedConsumer(redis_client, settings, name="c1"))
    assert redis_client.exists(redis_keys.person_items("dev-legacy"))
    land(LakeWriter(redis_client, settings, name="w1"))
    assert Lake(settings.lake.root).read_events(columns=["consent"]).to_pylist() == [{"consent": "personalisation"}]
    rejected = client.post("/v1/events", json=[view_event("dev-legacy", "i5", consent="maybe")])
    assert rejected.status_code == 422 and rejected.json()["errors"][0]["field"] == "0.consent"


def uses_person(body: dict[str, Any]) -> bool:
    personal = {"als", "covis", "next", "neighbours", "category"}
    return any(personal & set(item["sources"]) for item in body["items"])


def test_a_request_without_personalisation_consent_gets_a_non_personal_list(
    client: TestClient, redis_client: redis.Redis
) -> None:
    state = serving_state(client)
    post(client, view_event("dev-u4", "i5", user_id="u4"), view_event("dev-u4", "i13", user_id="u4"))
    drain(SpeedConsumer(redis_client, state.settings, name="c1"))
    personal = recs(client, user_id="u4", session_id="s1")
    assert uses_person(personal) and personal["degraded"] is None

    for consent in ("analytics", "none"):
        body = recs(client, user_id="u4", session_id="s1", consent=consent)
        assert body["items"] and not uses_person(body)
        assert body["degraded"].startswith("no_personalisation_consent")
        assert all(i["reason"].startswith(("trending", "new")) for i in body["items"])
    # A list served without analytics consent is not logged: impressions name the person.
    served = {consent: recs(client, user_id="u4", consent=consent)["request_id"] for consent in ("none", "analytics")}
    state.impressions.flush()
    logged = set(state.lake.read_impressions().column("request_id").to_pylist())
    assert served["analytics"] in logged and served["none"] not in logged


def test_withdrawing_personalisation_erases_person_state_and_caps_the_events_still_in_the_stream(
    client: TestClient, redis_client: redis.Redis
) -> None:
    settings = serving_state(client).settings
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    drain(consumer)
    user, device = "u33", "dev-u33"
    post(client, view_event(device, "i5"))
    post(client, {**view_event(device, "i5"), "event_type": "identify", "item_id": None, "user_id": user})
    post(client, *shopping(user, "personalisation"))
    drain(consumer)
    assert redis_keys.holdings(redis_client, user).keys and redis_client.exists(redis_keys.alias(device))
    post(client, *shopping(user, "personalisation", session="s2"))  # sent before, applied after
    before = popularity(redis_client, "i13")

    response = client.post(f"/v1/users/{user}/consent", json={"consent": "analytics"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["devices"] == 1 and body["redis_keys_deleted"] > 0 and body["lake_erasure_queued"] is None
    stream = redis_keys.stream(settings.redis.stream)
    assert {hit.split(": ")[0] for hit in naming(redis_client, [user, device])} == {stream}

    drain(consumer)  # the events in flight count in the aggregates and build nothing of the person
    assert redis_keys.holdings(redis_client, user).keys == frozenset()
    assert popularity(redis_client, "i13") == before + 2
    land(LakeWriter(redis_client, settings, name="w1"))  # analytics still allowed
    assert Lake(settings.lake.root).read_events().num_rows == 8  # all of them, the in-flight three too

    # Later events follow the consent they carry: a page that grants it again personalises again.
    post(client, *shopping(user, "personalisation", session="s3"))
    drain(consumer)
    assert redis_client.exists(redis_keys.session_recent(user, "s3"))


def test_withdrawing_analytics_queues_the_lake_erasure_and_lands_nothing_more(
    client: TestClient, redis_client: redis.Redis
) -> None:
    state = serving_state(client)
    settings = state.settings
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    writer = LakeWriter(redis_client, settings, name="w1")
    user, other = "u34", "u35"
    post(client, *shopping(user, "analytics"), *shopping(other, "analytics"))
    drain(consumer)
    land(writer)
    assert lake_persons(state.lake) == {"dev-u34", "dev-u35"}
    post(client, *shopping(user, "analytics", session="s2"))  # sent before, landed after
    before = popularity(redis_client, "i13")

    response = client.post(f"/v1/users/{user}/consent", json={"consent": "none"})
    assert response.status_code == 200, response.text
    assert response.json()["lake_erasure_queued"]
    assert [p["user_id"] for p in state.lake.pending_erasures()] == [user]

    drain(consumer)
    land(writer)
    assert popularity(redis_client, "i13") == before + 2  # still counted in the aggregates
    rows = state.lake.read_events(columns=["anonymous_id", "session_id"]).to_pylist()
    assert {r["session_id"] for r in rows if r["anonymous_id"] == "dev-u34"} == {"s1"}  # not the s2 in flight
    apply_erasures(state.lake)  # the nightly step
    assert lake_persons(state.lake) == {"dev-u35"}


def test_granting_personalisation_erases_nothing(client: TestClient, redis_client: redis.Redis) -> None:
    settings = serving_state(client).settings
    post(client, *shopping("u36", "personalisation"))
    drain(SpeedConsumer(redis_client, settings, name="c1"))
    held = redis_keys.holdings(redis_client, "u36").keys
    response = client.post("/v1/users/u36/consent", json={"consent": "personalisation"})
    assert response.status_code == 200 and response.json()["redis_keys_deleted"] == 0
    assert redis_keys.holdings(redis_client, "u36").keys == held
    assert client.post("/v1/users/u36/consent", json={"consent": "all"}).status_code == 422
