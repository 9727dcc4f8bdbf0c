"""A PreparedRoute answers as FastAPI's own resolution of the same route would: the same status, headers
that matter and body for valid requests and for every kind of refusal, with auth on; and it does skip
FastAPI's resolution. The similar-items body is also held to its documented model (it no longer goes
through FastAPI's response model)."""

from __future__ import annotations

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
    assert swapped == 2, "the recommendations and similar-items routes are prepared"
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
    assert reference.get("/v1/recommendations?user_id=u1", headers=READER).status_code == 200
    assert reference.get("/v1/items/i3/similar", headers=READER).status_code == 200
    assert calls == 2


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
