"""Every endpoint's success and error paths: events, parameters, similar items, catalog, erasure, admin, health, auth."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jsonschema
import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel, publish_synthetic_model
from common import redis_keys
from common.catalog import MAX_BRAND, MAX_CATEGORY_DEPTH, MAX_CATEGORY_NAME, MAX_TITLE
from common.events import Event, EventType
from common.lake import Lake
from common.neighbours import session_token
from common.redis_server import RedisServer
from common.sequence import FOLLOW_UNIT
from common.speed_state import READ_FLAGS
from common.stream import decode_entry
from serving.api.routes.recommendations import RecommendationsQuery
from serving.main import create_app
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import add_events, make_event, speed_settings
from tests.test_serving_day_counts import zmscore_calls
from tests.test_serving_support import (
    KEYS,
    ids,
    make_settings,
    recs,
    seed_session_view,
    serving_state,
    view_event,
)

# The fixtures (model_template, published, client) live in the support module.
pytest_plugins = ["tests.test_serving_support"]

STREAM = redis_keys.stream("events")


# ---------------------------------------------------------------- events


def test_single_event_is_accepted_into_the_stream(client: TestClient, redis_client: redis.Redis) -> None:
    event = view_event("anon-1", "i5")
    response = client.post("/v1/events", json=event)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] == 1 and body["rejected"] == 0
    [(entry_id, fields)] = redis_client.xrange(STREAM)
    assert body["results"][0]["stream_id"] == entry_id.decode()
    stored = decode_entry(fields)
    assert stored.event_id == event["event_id"] and stored.received_at is not None


def test_batch_keeps_good_events_and_names_bad_fields(client: TestClient, redis_client: redis.Redis) -> None:
    good = view_event("anon-2", "i6")
    no_item = {**view_event("anon-2", "i6"), "item_id": None}
    bad_id = {**view_event("anon-2", "i7"), "event_id": "not-a-uuid", "price": -1}
    response = client.post("/v1/events", json=[good, no_item, bad_id])
    assert response.status_code == 422
    body = response.json()
    assert body["accepted"] == 1 and body["rejected"] == 2
    results = body["results"]
    assert results[0]["status"] == "accepted"
    assert results[1]["status"] == "rejected" and "item_id is required" in results[1]["errors"][0]["reason"]
    assert {e["field"] for e in results[2]["errors"]} == {"event_id", "price"}
    assert redis_client.xlen(STREAM) == 1


def test_oversized_and_empty_batches_are_refused(published: SyntheticModel) -> None:
    with TestClient(create_app(make_settings(max_batch=3))) as small:
        too_many = small.post("/v1/events", json=[view_event("a", "i1") for _ in range(4)])
        assert too_many.status_code == 413 and too_many.json()["error"] == "batch_too_large"
        empty = small.post("/v1/events", json=[])
        assert empty.status_code == 422


def test_backpressure_answers_503_with_retry_after(
    published: SyntheticModel, redis_client: redis.Redis
) -> None:
    redis_client.xgroup_create(STREAM, "speed", id="$", mkstream=True)
    for _ in range(5):
        redis_client.xadd(STREAM, {"e": "{}"})
    with TestClient(create_app(make_settings(max_stream_lag=3))) as lagging:
        response = lagging.post("/v1/events", json=view_event("a", "i1"))
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.json()["error"] == "backpressure"


def test_timestamps_beyond_the_calendar_are_refused_per_event(client: TestClient, redis_client: redis.Redis) -> None:
    good = view_event("anon-8", "i5")
    bad = [  # valid ISO 8601, but in UTC they fall in year 0 or 10000
        view_event("anon-8", "i5", ts="0001-01-01T00:00:00+01:00"),
        view_event("anon-8", "i5", ts="9999-12-31T23:59:59-01:00"),
        view_event("anon-8", "i5", received_at="0001-01-01T00:00:00+01:00"),
    ]
    response = client.post("/v1/events", json=[good, *bad])
    assert response.status_code == 422
    body = response.json()
    assert body["accepted"] == 1 and redis_client.xlen(STREAM) == 1
    assert [(r["status"], [e["field"] for e in r.get("errors", [])]) for r in body["results"]] == [
        ("accepted", []), ("rejected", ["ts"]), ("rejected", ["ts"]), ("rejected", ["received_at"]),
    ]  # fmt: skip


def test_ids_with_control_characters_are_refused_naming_the_field(
    client: TestClient, redis_client: redis.Redis
) -> None:
    good = view_event("anon-9", "i5")
    bad = {  # field -> an event whose id in that field holds a control or non-printable character
        "anonymous_id": view_event("anon\x00", "i5"),
        "user_id": view_event("anon-9", "i5", user_id="u\x07"),
        "session_id": view_event("anon-9", "i5", session="s\x1b[0m"),
        "item_id": view_event("anon-9", "i\x7f"),
        "rec_request_id": view_event("anon-9", "i5", rec_request_id="r\u2028x"),
    }
    response = client.post("/v1/events", json=[good, *bad.values()])
    assert response.status_code == 422
    body = response.json()
    assert body["accepted"] == 1 and redis_client.xlen(STREAM) == 1
    assert [r["errors"][0]["field"] for r in body["results"][1:]] == list(bad)

    for method, url, params, field in [
        ("GET", "/v1/recommendations", {"user_id": "u\x00"}, "user_id"),
        ("GET", "/v1/recommendations", {"anonymous_id": "a\x00b"}, "anonymous_id"),
        ("GET", "/v1/recommendations", {"user_id": "u1", "session_id": "s\n1"}, "session_id"),
        ("GET", "/v1/recommendations", {"user_id": "u1", "context": "product", "item_id": "i\x01"}, "item_id"),
        ("GET", "/v1/items/i9%00/similar", {}, "item_id"),
        ("DELETE", "/v1/users/u%00", {}, "user_id"),
    ]:
        answer = client.request(method, url, params=params)
        assert answer.status_code == 422, (url, params, answer.text)
        assert field in {e["field"] for e in answer.json()["errors"]}, answer.text
    catalog = client.put("/v1/catalog/items", json=[{"item_id": "i\x00", "in_stock": False}])
    assert catalog.status_code == 422 and catalog.json()["errors"][0]["field"] == "0.item_id"


# ---------------------------------------------------------------- recommendation parameters


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"k": 10}, "user_id"),
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": 101}, "k"),
        ({"user_id": "u1", "context": "checkout"}, "context"),
        ({"user_id": "u1", "context": "product"}, "item_id"),
    ],
)
def test_bad_parameters_are_named(client: TestClient, params: dict[str, object], field: str) -> None:
    response = client.get("/v1/recommendations", params=params)
    assert response.status_code == 422
    assert field in {e["field"] for e in response.json()["errors"]}


def test_a_query_parameter_given_twice_is_refused_naming_it(client: TestClient) -> None:
    for url in ("/v1/recommendations?user_id=u1&user_id=u2", "/v1/items/i1/similar?k=3&k=4"):
        response = client.get(url)
        assert response.status_code == 422, (url, response.text)
        assert [e["field"] for e in response.json()["errors"]] == [url.rsplit("&", 1)[1].split("=")[0]]


# ---------------------------------------------------------------- similar items


def test_similar_items_share_the_category(client: TestClient) -> None:
    response = client.get("/v1/items/i9/similar", params={"k": 5})
    assert response.status_code == 200
    body = response.json()
    assert len(body["items"]) == 5 and "i9" not in [i["item_id"] for i in body["items"]]
    assert all(i["category"] == "cat1" for i in body["items"])  # 9 % 8
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_the_speed_layer_s_live_co_visits_of_the_item_join_its_similar_items(client: TestClient) -> None:
    live = serving_state(client).redis.client
    # i12 is of another category than i9 (cat4, cat1) and in none of i9's batch co-visits: only the live row names it.
    live.hset(redis_keys.covisitation("i9"), mapping={"i12": 50 * FOLLOW_UNIT, "i17": 3 * FOLLOW_UNIT})
    items = {i["item_id"]: i for i in client.get("/v1/items/i9/similar", params={"k": 5}).json()["items"]}
    assert items["i12"]["source"] == "covis" and items["i12"]["score"] >= 1.0  # 50 of the row's largest 50: share 1


def test_similar_items_read_live_state_again_after_redis_forgot_the_scripts(client: TestClient) -> None:
    live = serving_state(client).redis.client
    live.hset(redis_keys.covisitation("i9"), "i12", 50 * FOLLOW_UNIT)
    live.script_flush()  # as a restarted Redis: the flags' script is gone
    body = client.get("/v1/items/i9/similar", params={"k": 5}).json()
    assert body.get("degraded") is None and "i12" in {i["item_id"] for i in body["items"]}
    assert live.script_exists(READ_FLAGS.sha) == [True]


def test_only_similar_items_make_the_unit_length_copy_of_the_factors(client: TestClient) -> None:
    # Lists never read it: a push helper, which only makes lists, holds no such private copy.
    assert client.get("/v1/recommendations", params={"user_id": "u1", "item_id": "i9", "context": "product"}).status_code == 200
    assert "unit_factors" not in vars(serving_state(client).models.current)
    assert client.get("/v1/items/i9/similar").status_code == 200
    assert "unit_factors" in vars(serving_state(client).models.current)


def test_similar_items_of_an_unknown_item_is_404(client: TestClient) -> None:
    response = client.get("/v1/items/nope/similar")
    assert response.status_code == 404 and response.json()["error"] == "unknown_item"


# ---------------------------------------------------------------- catalog


def test_catalog_update_writes_live_state_and_validates(
    client: TestClient, redis_client: redis.Redis
) -> None:
    response = client.put(
        "/v1/catalog/items",
        json=[{"item_id": "i1", "in_stock": False}, {"item_id": "i2", "promoted": True, "price": 9.5}],
    )
    assert response.status_code == 200 and response.json()["updated"] == 2
    assert redis_client.sismember(redis_keys.OUT_OF_STOCK, "i1")
    assert redis_client.sismember(redis_keys.PROMOTED, "i2")
    assert serving_state(client).catalog.get("i2").price == 9.5  # type: ignore[union-attr]
    bad = client.put("/v1/catalog/items", json=[{"item_id": "i3", "price": -5}])
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "0.price"


@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"title": "t" * (MAX_TITLE + 1)}, "1.title"),
        ({"brand": "b" * (MAX_BRAND + 1)}, "1.brand"),
        ({"category_path": ["c"] * (MAX_CATEGORY_DEPTH + 1)}, "1.category_path"),
        ({"category_path": ["Shoes", "c" * (MAX_CATEGORY_NAME + 1)]}, "1.category_path.1"),
        ({"price": True}, "1.price"),
    ],
)
def test_catalog_strings_and_lists_are_bounded_naming_the_field(
    client: TestClient, update: dict[str, Any], field: str
) -> None:
    response = client.put("/v1/catalog/items", json=[{"item_id": "i1"}, {"item_id": "i2", **update}])
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == [field]
    bounds = client.app.openapi()["components"]["schemas"]["ItemUpdate"]["properties"]  # type: ignore[attr-defined]
    assert {"maxLength": MAX_TITLE, "type": "string"} in bounds["title"]["anyOf"]


# ---------------------------------------------------------------- erasure


def test_erasure_removes_speed_state_queues_lake_erasure_and_forgets_the_user(
    client: TestClient, redis_client: redis.Redis
) -> None:
    seed_session_view(redis_client, "u4", "s-e", "i12", "cat4", {"i20": 5.0})
    redis_client.set(redis_keys.user_delta("u4", "v1"), b"\0" * 64)
    redis_client.hset(redis_keys.person_items("u40"), "i1", 1.0)  # another person, kept
    mine, theirs = (redis_keys.neighbour_session(session_token(p, "s-e")) for p in ("u4", "u40"))
    redis_client.zadd(mine, {"i12": 1.0})  # the session as a session-kNN neighbour
    redis_client.zadd(theirs, {"i12": 1.0})
    assert any("als" in i["sources"] for i in recs(client, user_id="u4")["items"])

    response = client.delete("/v1/users/u4")
    assert response.status_code == 200
    body = response.json()
    assert body["redis_keys_deleted"] >= 4
    assert redis_client.keys("lr:{u:u4}:*") == []
    assert redis_client.exists(redis_keys.person_items("u40"))
    assert not redis_client.exists(mine) and redis_client.exists(theirs)
    pending = Lake(str(serving_state(client).settings.lake.root)).pending_erasures()
    assert [p["user_id"] for p in pending] == ["u4"]
    after = recs(client, user_id="u4")
    assert not any("als" in i["sources"] for i in after["items"])  # the batch vector is ignored now


def test_erasure_deletes_exactly_the_persons_keys_whatever_the_ids_hold(
    client: TestClient, redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # `a}:s:b` is a person whose keys a pattern built for `a` once matched; the others hold glob characters.
    people = ["a", "a}:s:b", "a}:delta:x", "a*", "a?", "[a]", "a\\"]
    settings = speed_settings(tmp_path, redis_server.url)
    for person in people:  # the state the real speed layer keeps: session, cart, purchases, markers, ...
        add_events(
            redis_client,
            settings,
            [make_event(kind, item, anonymous_id=person) for kind, item in
             ((EventType.VIEW, "i1"), (EventType.ADD_TO_CART, "i2"), (EventType.PURCHASE, "i3"))],
        )  # fmt: skip
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    while consumer.poll_once(block=False):
        pass

    for victim in people:
        before = set(redis_client.keys("*"))
        theirs = {
            key.encode()
            for key in (
                redis_keys.person_items(victim), redis_keys.person_purchases(victim),
                redis_keys.person_sessions(victim), redis_keys.seen_events(victim),
                redis_keys.session_recent(victim, "s1"), redis_keys.session_categories(victim, "s1"),
                redis_keys.session_cart(victim, "s1"), redis_keys.session_counts(victim, "s1"),
                redis_keys.neighbour_session(session_token(victim, "s1")),
            )
        } & before  # fmt: skip
        assert len(theirs) >= 6, victim
        response = client.delete(f"/v1/users/{quote(victim, safe='')}")
        assert response.status_code == 200 and response.json()["user_id"] == victim
        tombstone = redis_keys.erased(victim).encode()  # named by a digest: it names no one
        assert set(redis_client.keys("*")) == (before - theirs) | {tombstone}, victim  # everyone else's survive
        assert response.json()["redis_keys_deleted"] == len(theirs)


# ---------------------------------------------------------------- admin


def test_admin_lists_and_activates_models(client: TestClient, recs_env: object) -> None:
    state = serving_state(client)
    publish_synthetic_model(state.registry, state.lake, version="v2", seed=99, activate=False)
    # The batch run found v2's ranker worse than its pools' heuristic order (spark_jobs/gate.py: ranker_loss).
    lost = "its ranker ordered the held-out window's pools worse than their heuristic order"
    state.registry.write_manifest(state.registry.read_manifest("v2").model_copy(update={"ranker_unused": lost}))
    listed = client.get("/v1/admin/models").json()
    assert listed["current"] == "v1" and listed["serving"] == "v1"
    assert [m["version"] for m in listed["models"]] == ["v1", "v2"]
    assert [m["ranker_unused"] for m in listed["models"]] == [None, lost]
    assert state.models.current is not None and state.models.current.scorer is not None

    assert client.post("/v1/admin/models/v9/activate").status_code == 404
    response = client.post("/v1/admin/models/v2/activate")
    assert response.status_code == 200
    assert response.json()["previous"] == "v1" and response.json()["serving"] == "v2"
    assert state.registry.current() == "v2"
    assert recs(client, user_id="u1")["model_version"] == "v2"
    served = state.models.current
    assert served is not None and served.artifacts.ranker is not None and served.scorer is None  # pools in heuristic order


def test_the_served_model_is_kept_out_of_full_collections_and_a_swap_frees_the_old_one(client: TestClient) -> None:
    state = serving_state(client)
    served = state.models.current
    assert served is not None and gc.is_tracked(served)
    assert id(served) not in _walked_by_collections()  # frozen
    old = weakref.ref(served)
    del served
    publish_synthetic_model(state.registry, state.lake, version="v2", seed=99, activate=False)
    assert client.post("/v1/admin/models/v2/activate").status_code == 200
    assert old() is None  # freed with everything it held, frozen or not
    swapped = state.models.current
    assert swapped is not None and swapped.version == "v2" and id(swapped) not in _walked_by_collections()


def _walked_by_collections() -> set[int]:
    """ids of the objects in the generations a collection walks (frozen ones are in none)."""
    return {id(obj) for obj in gc.get_objects()}


def test_a_broken_version_is_refused_and_nothing_changes(client: TestClient) -> None:
    state = serving_state(client)
    publish_synthetic_model(state.registry, state.lake, version="v3", seed=5, activate=False)
    state.registry.fs.rm(state.registry.path("v3", "item_factors.npy"))
    response = client.post("/v1/admin/models/v3/activate")
    assert response.status_code == 409
    assert state.registry.current() == "v1" and recs(client, user_id="u1")["model_version"] == "v1"


# ---------------------------------------------------------------- health and metrics


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "v1"
    recs(client, user_id="u1")
    text = client.get("/metrics").text
    assert 'recs_request_seconds_count{method="GET",route="/v1/recommendations",status="2xx"}' in text
    assert "recs_candidates_per_request_bucket" in text
    assert 'recs_model_version_info{version="v1"} 1.0' in text
    assert "recs_stream_lag" in text


def test_readyz_is_503_without_a_model(recs_env: object, redis_client: redis.Redis) -> None:
    with TestClient(create_app(make_settings())) as empty:
        response = empty.get("/readyz")
        assert response.status_code == 503
        assert response.json()["ready"] is False and response.json()["redis"] == "up"


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    expected = {
        "/v1/events", "/v1/recommendations", "/v1/items/{item_id}/similar", "/v1/catalog/items",
        "/v1/users/{user_id}", "/v1/admin/models", "/v1/admin/models/{version}/activate",
        "/healthz", "/readyz", "/metrics", "/v1/users/{user_id}/consent",
    }  # fmt: skip
    assert expected <= set(spec["paths"])
    events_body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    assert {"single", "batch"} <= set(events_body["examples"])
    assert spec["components"]["schemas"]["Consent"]["enum"] == ["none", "analytics", "personalisation"]
    params = {p["name"]: p for p in spec["paths"]["/v1/recommendations"]["get"]["parameters"]}
    assert params["consent"]["schema"]["default"] == "personalisation"
    # The route's query model is documented field by field, as separately declared parameters would be.
    assert list(params) == list(RecommendationsQuery.model_fields)
    assert {p["in"] for p in params.values()} == {"query"}
    assert "examples" in spec["components"]["schemas"]["RecommendationsResponse"]


def test_openapi_states_the_event_contract_of_common_events(client: TestClient) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    schemas = spec["components"]["schemas"]
    event = schemas["Event"]
    assert set(event["properties"]) == set(Event.model_fields)
    assert {"event_id", "event_type", "ts", "anonymous_id"} == set(event["required"])
    ref = {"$ref": "#/components/schemas/Event"}
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["anyOf"] == [ref, {"type": "array", "items": ref, "minItems": 1}]
    # The rules by event type are in the schema: a client-side validator refuses what the API would.
    validator = jsonschema.Draft202012Validator({**ref, "components": spec["components"]})
    assert validator.is_valid(view_event("anon-1", "i1"))
    assert not validator.is_valid({**view_event("anon-1", "i1"), "item_id": None})
    assert not validator.is_valid({**view_event("anon-1", "i1"), "event_type": "search", "item_id": None})
    assert not validator.is_valid({**view_event("anon-1", "i1"), "anonymous_id": "a\x00"})
    assert not validator.is_valid({**view_event("anon-1", "i1"), "quantity": "2"})


def test_openapi_documents_the_sse_route_as_an_event_stream(client: TestClient) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    ok = spec["paths"]["/v1/stream/recommendations"]["get"]["responses"]["200"]
    assert set(ok["content"]) == {"text/event-stream"}
    kinds = ok["content"]["text/event-stream"]["itemSchema"]["oneOf"]
    data = {kind["properties"]["event"]["const"]: kind["properties"]["data"] for kind in kinds}
    assert data["recommendations"]["contentSchema"] == {"$ref": "#/components/schemas/RecommendationsResponse"}
    assert data["error"]["contentSchema"] == {"$ref": "#/components/schemas/ErrorBody"}


def declared_schema(spec: dict[str, Any], method: str, route: str | None, status: int) -> dict[str, Any]:
    """The body schema the OpenAPI promises for this status of this route (a miss fails the test)."""
    if route is None:  # no route matched: all a client can be promised is the error shape
        return {"$ref": "#/components/schemas/ErrorBody"}
    responses = spec["paths"][route][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {route} does not document {status}"
    schema: dict[str, Any] = responses[str(status)]["content"]["application/json"]["schema"]
    return schema


JSON = {"Content-Type": "application/json"}
NO_EVENT_ID = {k: v for k, v in view_event("anon-3", "i5").items() if k != "event_id"}


@pytest.mark.parametrize(
    ("method", "url", "route", "sent", "status"),
    [
        ("post", "/v1/events", "/v1/events", {"content": b'[{"event_id": ', "headers": JSON}, 422),
        ("put", "/v1/catalog/items", "/v1/catalog/items", {"content": b'[{"item_id": "\xff"}]', "headers": JSON}, 400),
        ("get", "/v1/no-such-route", None, {}, 404),
        ("post", "/v1/events", "/v1/events", {"json": [view_event("anon-3", "i5"), NO_EVENT_ID]}, 422),
        ("post", "/v1/events", "/v1/events", {"json": "not an event"}, 422),
        ("put", "/v1/catalog/items", "/v1/catalog/items", {"json": [{"item_id": "i1", "promoted": 0}]}, 422),
    ],
    ids=["malformed-json", "undecodable", "unknown-route", "rejected-event",
         "not-an-event", "promoted-0"],
)  # fmt: skip
def test_error_responses_match_the_openapi(
    client: TestClient, method: str, url: str, route: str | None, sent: dict[str, Any], status: int
) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    response = client.request(method.upper(), url, **sent)
    assert response.status_code == status, response.text
    schema = declared_schema(spec, method, route, status)
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(response.json())


def test_every_route_documents_its_client_errors_in_the_error_shape(client: TestClient) -> None:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    schemas = spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            declared = {int(s) for s in operation["responses"] if s.startswith("4")}
            if operation.get("parameters") or operation.get("requestBody"):
                assert 422 in declared, (method, path)
            if operation.get("requestBody"):
                assert {400, 413} <= declared, (method, path)
            for status in declared:
                schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
                for ref in schema.get("anyOf", [schema]):
                    required = set(schemas[ref["$ref"].rsplit("/", 1)[1]]["required"])
                    assert {"error", "message"} <= required, (method, path, status)


# ---------------------------------------------------------------- auth


@pytest.fixture
def secured(published: SyntheticModel) -> Iterator[TestClient]:
    with TestClient(
        create_app(make_settings(keys=KEYS, cors_origins=["https://shop.example"]))
    ) as test_client:
        yield test_client


def test_auth_scopes_are_enforced(secured: TestClient) -> None:
    missing = secured.get("/v1/recommendations", params={"user_id": "u1"})
    assert missing.status_code == 401 and missing.json()["error"] == "missing_api_key"
    wrong = secured.get("/v1/recommendations", params={"user_id": "u1"}, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_api_key"
    storefront = {"X-API-Key": "key-storefront-0001"}
    forbidden = secured.get("/v1/recommendations", params={"user_id": "u1"}, headers=storefront)
    assert forbidden.status_code == 403 and "recs:read" in forbidden.json()["message"]
    assert "key-storefront" not in forbidden.text  # keys are never echoed
    assert secured.post("/v1/events", json=view_event("a", "i1"), headers=storefront).status_code == 202
    reader = {"Authorization": "Bearer key-reader-0002"}
    assert secured.get("/v1/recommendations", params={"user_id": "u1"}, headers=reader).status_code == 200
    assert secured.get("/v1/admin/models", headers=reader).status_code == 403
    assert secured.delete("/v1/users/u1", headers=reader).status_code == 403
    assert secured.get("/v1/admin/models", headers={"X-API-Key": "key-admin-0003"}).status_code == 200
    assert secured.get("/healthz").status_code == 200  # probes need no key


def test_a_refused_key_is_answered_before_the_parameters_are_checked(secured: TestClient) -> None:
    # The scope check runs before the query model is validated: a caller without access learns nothing
    # about the parameters, and a repeated one is refused before both.
    bad = {"user_id": "u1", "k": "abc", "context": "nowhere"}
    assert secured.get("/v1/recommendations", params=bad).json()["error"] == "missing_api_key"
    storefront = {"X-API-Key": "key-storefront-0001"}
    assert secured.get("/v1/recommendations", params=bad, headers=storefront).json()["error"] == "insufficient_scope"
    invalid = secured.get("/v1/recommendations", params=bad, headers={"X-API-Key": "key-reader-0002"})
    assert invalid.status_code == 422 and [e["field"] for e in invalid.json()["errors"]] == ["k", "context"]
    repeated = secured.get("/v1/recommendations?user_id=u1&k=1&k=2")
    assert repeated.status_code == 422 and repeated.json()["errors"] == [{"field": "k", "reason": "given more than once"}]


def test_the_demo_storefront_needs_a_key_once_keys_are_configured(secured: TestClient, client: TestClient) -> None:
    for path in ("/demo/", "/demo/app.js", "/demo/catalog"):
        missing = secured.get(path)
        assert missing.status_code == 401 and missing.json()["error"] == "missing_api_key", path
        assert secured.get(path, headers={"X-API-Key": "guess"}).status_code == 401, path
        assert secured.get(path, headers={"X-API-Key": "key-storefront-0001"}).status_code == 403, path
        assert secured.get(path, headers={"Authorization": "Bearer key-reader-0002"}).status_code == 200, path
        assert client.get(path).status_code == 200, path  # auth off: the embedded demo stays open


def test_cors_allows_configured_origins_only(secured: TestClient) -> None:
    allowed = secured.options(
        "/v1/recommendations",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"},
    )
    assert allowed.headers.get("access-control-allow-origin") == "https://shop.example"
    other = secured.options(
        "/v1/recommendations",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_a_busy_worker_counts_today_from_its_copy_without_a_round_trip(
    published: SyntheticModel, redis_client: redis.Redis
) -> None:
    people = [f"u{n}" for n in range(8)]  # some in the ranker's share, whose features read today's counts
    with TestClient(create_app(make_settings(today_counts_refresh_s=0.05))) as app_client:
        calls = zmscore_calls(redis_client)
        for person in people:
            recs(app_client, user_id=person)
        assert zmscore_calls(redis_client) > calls  # live until the worker has seen its traffic
        deadline = time.monotonic() + 60
        while True:  # the refresh thread copies today within a period or two of the traffic
            calls = zmscore_calls(redis_client)
            lists = {person: ids(recs(app_client, user_id=person)) for person in people}
            if zmscore_calls(redis_client) == calls:
                break
            assert time.monotonic() < deadline, "the worker never read today's counts from a copy"
    with TestClient(create_app(make_settings(today_counts_refresh_s=0))) as live_client:
        assert {person: ids(recs(live_client, user_id=person)) for person in people} == lists


def test_warm_recommendations_read_nothing_from_the_lake_or_the_registry(
    client: TestClient, recs_env: Path
) -> None:
    """A warm request does no disk or model-loading work: with the lake and the registry gone from
    under it, the same requests answer the same lists, not degraded."""
    before = {n: recs(client, user_id=f"u{n}") for n in range(20)}
    for store in ("models", "lake"):
        (recs_env / store).rename(recs_env / f"{store}-away")
    after = {n: recs(client, user_id=f"u{n}") for n in range(20)}
    assert {n: ids(body) for n, body in after.items()} == {n: ids(body) for n, body in before.items()}
    assert all(body["degraded"] is None for body in after.values())
