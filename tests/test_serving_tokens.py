"""Session tokens on the real app and real Redis: issue, scope, forgery, expiry, rotation, the SSE stream, /demo."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from common import redis_keys
from common.redis_server import free_port
from common.settings import ApiSettings, SettingsError, dump_settings, load_settings
from serving.core import tokens
from serving.main import create_app
from tests.test_serving_support import KEYS, SHOP_KEY, TOKEN_SECRET, make_settings, view_event

pytest_plugins = ["tests.test_serving_support"]

STREAM = redis_keys.stream("events")
SHOP = {"X-API-Key": SHOP_KEY}
OTHER_SECRET = "another-token-secret-0123456789abcdef"


@pytest.fixture
def secured(published: SyntheticModel) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(keys=KEYS, token_secret=TOKEN_SECRET))) as test_client:
        yield test_client


def token_for(client: TestClient, session: str = "s1", anonymous: str = "a1", **body: Any) -> str:
    response = client.post(
        "/v1/tokens", json={"session_id": session, "anonymous_id": anonymous, **body}, headers=SHOP
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def signed(claims: dict[str, Any], secret: str = TOKEN_SECRET, ttl_s: int = 900) -> str:
    api = ApiSettings(token_secret=secret, token_ttl_s=ttl_s)  # type: ignore[arg-type]
    return tokens.issue(api, tokens.TokenClaims.model_validate(claims))


def claims(**changes: Any) -> dict[str, Any]:
    return {
        "session_id": "s1",
        "anonymous_id": "a1",
        "scopes": ["events:write", "recs:read"],
        "expires_at": int(time.time()) + 600,
        **changes,
    }


# ---------------------------------------------------------------- issue and scope


def test_a_storefront_key_gets_a_token_with_the_scopes_it_holds(secured: TestClient) -> None:
    body = {"session_id": "s1", "anonymous_id": "a1"}
    missing = secured.post("/v1/tokens", json=body)
    assert missing.status_code == 401 and missing.json()["error"] == "missing_api_key"
    answer = secured.post("/v1/tokens", json=body, headers=SHOP)
    assert answer.status_code == 200
    issued = answer.json()
    assert issued["scopes"] == ["events:write", "recs:read"] and issued["token_type"] == "Bearer"
    assert 0 < issued["expires_in"] <= 900 and issued["token"].startswith("lrt1.")
    assert SHOP_KEY not in answer.text and TOKEN_SECRET not in answer.text

    writer = secured.post("/v1/tokens", json=body, headers={"X-API-Key": "key-storefront-0001"})
    assert writer.json()["scopes"] == ["events:write"]  # a key grants no more than it holds
    more = secured.post("/v1/tokens", json={**body, "scopes": ["recs:read"]}, headers={"X-API-Key": "key-storefront-0001"})
    assert more.status_code == 403 and more.json()["error"] == "insufficient_scope"
    admin_only = secured.post("/v1/tokens", json={**body, "scopes": ["admin"]}, headers=SHOP)
    assert admin_only.status_code == 422  # tokens never carry admin


def test_no_secret_no_tokens(published: SyntheticModel) -> None:
    with TestClient(create_app(make_settings(keys=KEYS))) as client:
        answer = client.post("/v1/tokens", json={"session_id": "s1", "anonymous_id": "a1"}, headers=SHOP)
        assert answer.status_code == 503 and answer.json()["error"] == "tokens_not_configured"


def test_a_token_writes_and_reads_for_its_session_and_person_only(
    secured: TestClient, redis_client: redis.Redis
) -> None:
    token = token_for(secured, "s1", "a1")
    own = secured.post("/v1/events", json=[view_event("a1", "i1", "s1")], headers=bearer(token))
    assert own.status_code == 202
    assert redis_client.xlen(STREAM) == 1

    for event, field in (
        (view_event("a2", "i1", "s1"), "anonymous_id"),
        (view_event("a1", "i1", "s2"), "session_id"),
        (view_event("a1", "i1", "s1", user_id="u9"), "user_id"),
    ):
        refused = secured.post("/v1/events", json=[view_event("a1", "i2", "s1"), event], headers=bearer(token))
        assert refused.status_code == 403, field
        assert refused.json()["error"] == "token_scope" and field in refused.json()["message"]
    assert redis_client.xlen(STREAM) == 1  # nothing of a refused batch was kept
    beacon = secured.post(f"/v1/events?access_token={token}", json=[view_event("a1", "i3", "s1")])
    assert beacon.status_code == 202  # sendBeacon cannot set a header

    mine = {"anonymous_id": "a1", "session_id": "s1"}
    assert secured.get("/v1/recommendations", params=mine, headers=bearer(token)).status_code == 200
    assert secured.get("/v1/recommendations", params={**mine, "access_token": token}).status_code == 200
    for other in ({"anonymous_id": "a2"}, {"session_id": "s2"}, {"session_id": None}, {"user_id": "u1"}):
        params = {k: v for k, v in {**mine, **other}.items() if v is not None}
        refused = secured.get("/v1/recommendations", params=params, headers=bearer(token))
        assert refused.status_code == 403 and refused.json()["error"] == "token_scope", other

    # A token is not a key: routes beyond the person's own refuse it.
    assert secured.get("/v1/items/i1/similar", headers=bearer(token)).status_code == 401
    assert secured.get("/v1/admin/models", headers=bearer(token)).status_code == 401
    tokenless = secured.post("/v1/tokens", json={"session_id": "s1", "anonymous_id": "a1"}, headers=bearer(token))
    assert tokenless.status_code == 401  # a token cannot mint tokens


def test_a_logged_in_token_covers_the_user_and_the_device(secured: TestClient) -> None:
    token = token_for(secured, "s1", "a1", user_id="u1")
    for params in ({"user_id": "u1"}, {"anonymous_id": "a1"}, {"user_id": "u1", "anonymous_id": "a1"}):
        answer = secured.get("/v1/recommendations", params={**params, "session_id": "s1"}, headers=bearer(token))
        assert answer.status_code == 200, params
    other = secured.get("/v1/recommendations", params={"user_id": "u2", "session_id": "s1"}, headers=bearer(token))
    assert other.status_code == 403
    event = view_event("a1", "i1", "s1", user_id="u1")
    assert secured.post("/v1/events", json=event, headers=bearer(token)).status_code == 202


def test_a_token_without_a_scope_is_refused_that_route(secured: TestClient) -> None:
    writer = secured.post(
        "/v1/tokens", json={"session_id": "s1", "anonymous_id": "a1", "scopes": ["events:write"]}, headers=SHOP
    ).json()["token"]
    refused = secured.get("/v1/recommendations", params={"anonymous_id": "a1", "session_id": "s1"}, headers=bearer(writer))
    assert refused.status_code == 403 and refused.json()["error"] == "insufficient_scope"


# ---------------------------------------------------------------- forged, expired, rotated


def test_forged_malformed_and_expired_tokens_are_refused(secured: TestClient, redis_client: redis.Redis) -> None:
    good = token_for(secured, "s1", "a1")
    prefix, payload, signature = good.split(".")
    widened = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    widened["anonymous_id"] = "a2"  # the claims changed, the signature kept
    forged_payload = base64.urlsafe_b64encode(json.dumps(widened).encode()).rstrip(b"=").decode()
    forgeries = {
        "claims changed": f"{prefix}.{forged_payload}.{signature}",
        "another secret": signed(claims(), secret=OTHER_SECRET),
        "no signature": f"{prefix}.{payload}.",
        "truncated": f"{prefix}.{payload}",
        "not base64": f"{prefix}.{payload}.é☃",
        "too long": f"{prefix}.{'A' * 3000}.{signature}",
        "outlives the ttl": signed(claims(expires_at=int(time.time()) + 7200), ttl_s=86_400),
    }
    for name, token in forgeries.items():
        refused = secured.post("/v1/events", json=view_event("a2", "i1", "s1"), params={"access_token": token})
        assert refused.status_code == 401, name
        assert refused.json()["error"] == "invalid_token", name
        assert refused.headers["www-authenticate"].startswith("Bearer"), name
        assert TOKEN_SECRET not in refused.text
    assert redis_client.xlen(STREAM) == 0

    expired = signed(claims(expires_at=int(time.time()) - 1))
    refused = secured.get("/v1/recommendations", params={"anonymous_id": "a1", "session_id": "s1"}, headers=bearer(expired))
    assert refused.status_code == 401 and refused.json()["error"] == "token_expired"


def test_after_a_rotation_tokens_of_the_previous_secret_are_accepted_until_they_expire(
    published: SyntheticModel,
) -> None:
    before = signed(claims())
    rotated = make_settings(keys=KEYS, token_secret=OTHER_SECRET, token_previous_secret=TOKEN_SECRET)
    params = {"anonymous_id": "a1", "session_id": "s1"}
    with TestClient(create_app(rotated)) as client:
        assert client.get("/v1/recommendations", params=params, headers=bearer(before)).status_code == 200
        new = token_for(client)
        assert client.get("/v1/recommendations", params=params, headers=bearer(new)).status_code == 200
        expired = signed(claims(expires_at=int(time.time()) - 1))
        assert client.get("/v1/recommendations", params=params, headers=bearer(expired)).status_code == 401
    dropped = make_settings(keys=KEYS, token_secret=OTHER_SECRET)
    with TestClient(create_app(dropped)) as client:
        refused = client.get("/v1/recommendations", params=params, headers=bearer(before))
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_token"


# ---------------------------------------------------------------- the SSE stream


@pytest.fixture
def served(published: SyntheticModel) -> Iterator[str]:
    """The app under uvicorn on a free port (the stream needs a real server's disconnects)."""
    settings = make_settings(keys=KEYS, token_secret=TOKEN_SECRET)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def sse_events(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("event:"):
            yield line.split(":", 1)[1].strip()


def test_the_stream_takes_a_token_in_the_query_and_ends_when_it_expires(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as http:
        params = {"anonymous_id": "a1", "session_id": "s1"}
        assert http.get("/v1/stream/recommendations", params=params).status_code == 401
        other = http.get("/v1/stream/recommendations", params={**params, "access_token": signed(claims(session_id="s2"))})
        assert other.status_code == 403 and other.json()["error"] == "token_scope"

        short = signed(claims(expires_at=int(time.time()) + 5))  # time for the first list on a loaded machine
        with http.stream("GET", "/v1/stream/recommendations", params={**params, "access_token": short}) as stream:
            assert stream.status_code == 200
            events = sse_events(stream)
            assert next(events) == "recommendations"
            assert next(events) == "token_expired"  # then the server ends the stream
            assert list(events) == []


# ---------------------------------------------------------------- OpenAPI, settings


def test_openapi_documents_the_token_route_and_its_refusals(secured: TestClient) -> None:
    spec = secured.get("/openapi.json").json()
    issue = spec["paths"]["/v1/tokens"]["post"]
    assert {"401", "403", "422", "503"} <= set(issue["responses"])
    for path, method in (("/v1/events", "post"), ("/v1/recommendations", "get"), ("/v1/stream/recommendations", "get")):
        responses = spec["paths"][path][method]["responses"]
        assert "token_expired" in responses["401"]["description"], path
        assert "token_scope" in responses["403"]["description"], path
        assert {"SessionToken": []} in spec["paths"][path][method]["security"], path
    scheme = spec["components"]["securitySchemes"]["SessionToken"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "query", "access_token")


def test_token_settings_are_checked_and_never_printed(recs_env: object) -> None:
    settings = make_settings(keys=KEYS, token_secret=TOKEN_SECRET, demo_key=SHOP_KEY)
    printed = dump_settings(settings)
    assert TOKEN_SECRET not in printed and SHOP_KEY not in printed
    assert TOKEN_SECRET not in repr(settings)  # a SecretStr, also in a traceback
    for bad, reason in (
        ({"keys": KEYS, "token_secret": "short"}, "at least 32"),
        ({"keys": KEYS, "token_secret": TOKEN_SECRET, "demo_key": "key-unknown-9"}, "one of keys"),
        ({"keys": KEYS, "demo_key": SHOP_KEY}, "needs token_secret"),
        ({"token_previous_secret": TOKEN_SECRET}, "needs token_secret"),
    ):
        with pytest.raises((SettingsError, ValueError), match=reason):
            load_settings(api=ApiSettings(**bad))


# ---------------------------------------------------------------- /demo with keys configured


def test_the_demo_works_with_keys_configured_and_never_hands_out_its_key(published: SyntheticModel) -> None:
    settings = make_settings(keys=KEYS, token_secret=TOKEN_SECRET, demo_key=SHOP_KEY)
    with TestClient(create_app(settings)) as client:
        for path in ("/demo/", "/demo/app.js", "/demo/tracker.js", "/demo/catalog"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert SHOP_KEY not in answer.text, path
        issued = client.post("/demo/token", json={"session_id": "s1", "anonymous_id": "a1"})
        assert issued.status_code == 200 and SHOP_KEY not in issued.text
        token = issued.json()["token"]
        assert client.post("/v1/events", json=view_event("a1", "i1", "s1"), headers=bearer(token)).status_code == 202
        assert client.get("/v1/recommendations", params={"anonymous_id": "a1"}).status_code == 401  # the rest stays shut
        as_user = client.post("/demo/token", json={"session_id": "s1", "anonymous_id": "a1", "user_id": "u1"})
        assert as_user.status_code == 422  # the demo has no login: it vouches for no user
    with TestClient(create_app(make_settings())) as open_client:
        assert open_client.post("/demo/token", json={"session_id": "s1", "anonymous_id": "a1"}).status_code == 204
