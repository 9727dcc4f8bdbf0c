"""A PreparedRoute answers as FastAPI's own resolution of the same route would: the same status, headers
that matter and body for valid requests and for every kind of refusal, with auth on; and it does skip
FastAPI's resolution. The similar-items body is also held to its documented model (it no longer goes
through FastAPI's response model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import request_response
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from serving.api import prepared
from serving.api.prepared import PreparedRoute
from serving.main import create_app
from tests.test_serving_support import KEYS, SHOP_KEY, TOKEN_SECRET, make_settings, view_event

pytest_plugins = ["tests.test_serving_support"]

READER = {"X-API-Key": "key-reader-0002"}
WRITER = {"X-API-Key": "key-storefront-0001"}  # no recs:read


@pytest.fixture
def both(published: SyntheticModel) -> Iterator[tuple[TestClient, TestClient]]:
    """The app as served, and the same app with each PreparedRoute handled by FastAPI's own resolution (and the
    endpoints' answers the same Response objects, so the comparison is of the resolution)."""
    settings = make_settings(keys=KEYS, token_secret=TOKEN_SECRET)
    served, reference = create_app(settings), create_app(settings)
    swapped = 0
    for route in reference.routes:
        if isinstance(route, PreparedRoute):
            route.app = request_response(route.fastapi_handler())
            swapped += 1
    assert swapped == 3, "the recommendations, similar-items and events routes are prepared"
    with TestClient(served) as served_client, TestClient(reference) as reference_client:
        yield served_client, reference_client


def _token(client: TestClient, session: str = "s1", anonymous: str = "a1") -> str:
    response = client.post(
        "/v1/tokens", json={"session_id": session, "anonymous_id": anonymous}, headers={"X-API-Key": SHOP_KEY}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def _answer(client: TestClient, path: str, headers: dict[str, str]) -> dict[str, Any]:
    """What must not differ: status, content type, the auth challenge, the body (less the random request id)."""
    response = client.get(path, headers=headers)
    body = response.json()
    if isinstance(body, dict):
        body.pop("request_id", None)
    return _compared(response, body)


def _compared(response: Any, body: Any) -> dict[str, Any]:
    return {
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
        "www_authenticate": response.headers.get("www-authenticate"),
        "body": body,
    }


def test_a_prepared_route_answers_as_fastapis_resolution(both: tuple[TestClient, TestClient]) -> None:
    served, reference = both
    served.post("/v1/events", json=view_event("u1", "i1", session="s1"), headers=WRITER)
    token = _token(served)
    base = "/v1/recommendations"
    cases: list[tuple[str, dict[str, str]]] = [
        (f"{base}?user_id=u1&k=5", READER),
        (f"{base}?user_id=u1&session_id=s1&context=cart", READER),
        (f"{base}?anonymous_id=a9&context=product&item_id=i3&k=3", READER),
        (f"{base}?user_id=u1&consent=necessary", READER),
        (f"{base}?user_id=u1&unknown=1", READER),  # not a parameter: ignored by both
        (f"{base}?user_id=u1", {"Authorization": "Bearer key-reader-0002"}),
        (f"{base}?user_id=u1", {"Authorization": "Bearer  key-reader-0002 "}),
        (f"{base}?user_id=u1", {"X-API-Key": "", "Authorization": "Bearer key-reader-0002"}),
        (f"{base}?anonymous_id=a1&session_id=s1", {"Authorization": f"Bearer {token}"}),
        (f"{base}?anonymous_id=a1&session_id=s1&access_token={token}", {}),
        # refusals: the scope
        (f"{base}?user_id=u1", {}),
        (f"{base}?user_id=u1", {"Authorization": "Basic key-reader-0002"}),
        (f"{base}?user_id=u1", {"Authorization": "Bearer"}),
        (f"{base}?user_id=u1", {"X-API-Key": "no-such-key"}),
        (f"{base}?user_id=u1", WRITER),
        (f"{base}?anonymous_id=a1&session_id=s2", {"Authorization": f"Bearer {token}"}),
        (f"{base}?anonymous_id=a1&session_id=s1&access_token={token}x", {}),
        # refusals: the query
        (f"{base}", READER),
        (f"{base}?user_id=u1&k=0", READER),
        (f"{base}?user_id=u1&k=101", READER),
        (f"{base}?user_id=u1&k=ten", READER),
        (f"{base}?user_id=u1&k=", READER),
        (f"{base}?user_id=u1&context=nowhere&consent=maybe", READER),
        (f"{base}?user_id=u1&context=product", READER),
        (f"{base}?user_id={'x' * 300}", READER),
        (f"{base}?user_id=u1&k=2&k=3", READER),
        (f"{base}?user_id=u1&k=2&k=3", {}),  # the repeat is refused before the missing key, by both
        (f"{base}?k=0", {}),  # the key is refused before the query
        # similar items: its path and query parameters validated together, no session token taken
        ("/v1/items/i3/similar?k=3", READER),
        ("/v1/items/i3/similar", {"Authorization": "Bearer key-reader-0002"}),
        ("/v1/items/nope/similar", READER),
        ("/v1/items/i3/similar?k=0", READER),
        ("/v1/items/i3/similar?k=x&unknown=1", READER),
        ("/v1/items/i9%00/similar", READER),
        ("/v1/items/i9%00/similar?k=101", READER),
        ("/v1/items/i3/similar?k=2&k=3", READER),
        ("/v1/items/i3/similar", {}),
        ("/v1/items/i3/similar", WRITER),
        ("/v1/items/i3/similar", {"Authorization": f"Bearer {token}"}),
        (f"/v1/items/i3/similar?access_token={token}", {}),
        ("/v1/items/i9%00/similar?k=0", {}),
    ]
    statuses = set()
    for path, headers in cases:
        ours, theirs = _answer(served, path, headers), _answer(reference, path, headers)
        assert ours == theirs, path
        statuses.add(ours["status"])
    assert statuses == {200, 401, 403, 404, 422}, "every kind of answer was compared"


def _posted(client: TestClient, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """What must not differ for a POST: as `_answer`, each accepted event's stream id only as present."""
    response = client.post("/v1/events", content=body, headers=headers)
    payload = response.json()
    for result in payload.get("results", []) if isinstance(payload, dict) else []:
        if "stream_id" in result:
            result["stream_id"] = bool(result["stream_id"])
    return _compared(response, payload)


def test_the_events_route_answers_as_fastapis_resolution(both: tuple[TestClient, TestClient]) -> None:
    """POST /v1/events parses its body itself when it is declared JSON and is an object or an array; every
    other body (and every refusal of one) is FastAPI's: the same answers either way."""
    served, reference = both
    token = _token(served)
    as_json = {"Content-Type": "application/json"}
    good = json.dumps(view_event("u1", "i1", session="s1"))
    batch = json.dumps([view_event("u1", "i1"), view_event("u2", "i2", session="s2")])
    mixed = json.dumps([view_event("u1", "i1"), {**view_event("u1", "i2"), "event_type": "teleport"}, {}])
    own = json.dumps(view_event("a1", "i1", session="s1") | {"user_id": None})
    other_session = json.dumps(view_event("a1", "i1", session="s2") | {"user_id": None})
    cases: list[tuple[str | bytes, dict[str, str]]] = [
        (good, {**WRITER, **as_json}),
        (batch, {**WRITER, **as_json}),
        (good, {**WRITER, "Content-Type": "application/json; charset=utf-8"}),
        (good, {"Authorization": "Bearer key-storefront-0001", **as_json}),
        (own, {"Authorization": f"Bearer {token}", **as_json}),
        # refusals of the events themselves, or of the batch
        (mixed, {**WRITER, **as_json}),
        ("[]", {**WRITER, **as_json}),
        (json.dumps([view_event("u1", "i1")] * 1001), {**WRITER, **as_json}),
        # refusals: the scope
        (good, as_json),
        (good, {**READER, **as_json}),
        (good, {"X-API-Key": "no-such-key", **as_json}),
        (other_session, {"Authorization": f"Bearer {token}", **as_json}),
        # bodies left to FastAPI: not JSON, not declared JSON, not an object or an array, none
        ("{not json", {**WRITER, **as_json}),
        ("{not json", as_json),  # FastAPI parses the body before it checks the key
        (good, WRITER),
        (good, {**WRITER, "Content-Type": "text/plain"}),
        (good, {**WRITER, "Content-Type": "application/vnd.shop+json"}),
        ('"view"', {**WRITER, **as_json}),
        ("12", {**WRITER, **as_json}),
        ("null", {**WRITER, **as_json}),
        ("", {**WRITER, **as_json}),
        (b"\xc3\x28", {**WRITER, **as_json}),  # not UTF-8: FastAPI's 400
    ]
    statuses = set()
    for body, headers in cases:
        raw = body if isinstance(body, bytes) else body.encode()
        ours, theirs = _posted(served, raw, headers), _posted(reference, raw, headers)
        assert ours == theirs, (raw[:60], headers)
        statuses.add(ours["status"])
    assert statuses == {202, 400, 401, 403, 413, 422}, "every kind of answer was compared"


def test_the_events_body_is_its_documented_model(both: tuple[TestClient, TestClient]) -> None:
    """The 202 body is encoded without EventsResponse: held to it here, field for field."""
    from serving.schemas import EventsResponse

    served, _ = both
    batch = [view_event("u1", "i1"), view_event("u2", "i2", session="s2")]
    response = served.post("/v1/events", json=batch, headers=WRITER)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body == EventsResponse.model_validate(body).model_dump(exclude_none=True)
    assert [r["event_id"] for r in body["results"]] == [e["event_id"] for e in batch]
    assert [r["index"] for r in body["results"]] == [0, 1]
    assert {r["status"] for r in body["results"]} == {"accepted"} and body["accepted"] == 2


def test_a_prepared_route_does_not_resolve_dependencies_through_fastapi(
    both: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the route: FastAPI's per-request resolution is not called (the reference app's is)."""
    import fastapi.routing

    calls = 0
    solve = fastapi.routing.solve_dependencies

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted)
    served, reference = both
    assert served.get("/v1/recommendations?user_id=u1", headers=READER).status_code == 200
    assert calls == 0
    assert served.get("/v1/items/i3/similar", headers=READER).status_code == 200
    assert calls == 0
    assert served.post("/v1/events", json=view_event("u1", "i1"), headers=WRITER).status_code == 202
    assert calls == 0
    assert reference.get("/v1/recommendations?user_id=u1", headers=READER).status_code == 200
    assert reference.get("/v1/items/i3/similar", headers=READER).status_code == 200
    assert reference.post("/v1/events", json=view_event("u1", "i1"), headers=WRITER).status_code == 202
    assert calls == 3


def test_an_endpoint_without_a_resolver_is_resolved_by_fastapi() -> None:
    async def endpoint(k: int) -> Any:
        return {"k": k}

    route = PreparedRoute("/plain", endpoint)
    assert endpoint not in prepared._RESOLVERS
    assert route.get_route_handler().__qualname__ == route.fastapi_handler().__qualname__


def test_the_similar_items_body_is_its_documented_model(both: tuple[TestClient, TestClient]) -> None:
    from serving.schemas import SimilarResponse

    served, _ = both
    response = served.get("/v1/items/i3/similar?k=5", headers=READER)
    assert response.status_code == 200
    body = response.json()
    assert SimilarResponse.model_validate(body).model_dump(mode="json") == body
    assert len(body["items"]) == 5
