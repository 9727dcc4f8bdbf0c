"""Live recommendations by Server-Sent Events or WebSocket, and the demo storefront: its catalog endpoint and files.

GET /v1/stream/recommendations (and /ws beside it) opens a stream on the worker's fan-out
(serving/core/push.py): when the speed layer says this person's (or session's) state changed,
the list is recomputed as GET /v1/recommendations computes it (same ranking, same body) and sent
as one event, unless it equals the last one sent; it is logged as an impression once sent. A
browser's EventSource (or WebSocket) sends no headers, so it authenticates with its session token
in the query.

With `api.demo_key` set the demo's server side presents that key for the page, which then works
with keys configured and never sees the key: it gets session tokens from POST /demo/token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, WebSocket, status
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import Headers
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from common.catalog import UNCATEGORISED
from common.events import DEFAULT_CONSENT, Consent, FieldError
from common.settings import Scope, Settings
from serving.api.deps import PersonRecsRead, PresentedKey, PushDep, SettingsDep, SingleQueryValues, StateDep
from serving.api.routes.recommendations import IdParam, log_served
from serving.api.routes.tokens import issue_token
from serving.core.auth import Grant, authorize, check_scope, held_scopes, key_from_headers
from serving.core.errors import PERSON_ERROR_RESPONSES, ApiError, ErrorBody, api_error_handler
from serving.core.push import Fanout, LiveStream, PushedList, StreamEnded, stream_keys
from serving.core.recommender import RecRequest
from serving.core.response_body import recommend_body
from serving.core.state import ServingState
from serving.schemas import Context, RecommendationsResponse, TokenRequest, TokenResponse

router = APIRouter(
    prefix="/v1/stream",
    tags=["recommendations"],
    responses=PERSON_ERROR_RESPONSES,
    dependencies=[SingleQueryValues],
)
# WebSocket routes are not in the OpenAPI (the SSE route's description documents this one), and
# take no HTTP dependencies: the handler checks auth itself, to refuse the handshake in the error shape.
ws_router = APIRouter(prefix="/v1/stream")
# The storefront reads the catalog and recommendations: with keys configured it needs a recs:read key.
DEMO_SCOPE: Scope = "recs:read"


def demo_key(settings: Settings, presented: str | None) -> str | None:
    """The key the demo acts with: the request's (a proxy may add one), else the demo's own, server side."""
    if presented or settings.api.demo_key is None:
        return presented
    return settings.api.demo_key.get_secret_value()


async def demo_access(settings: SettingsDep, presented: PresentedKey) -> str | None:
    key = demo_key(settings, presented)
    check_scope(settings, key, DEMO_SCOPE)
    return key


DemoKey = Annotated[str | None, Depends(demo_access)]
demo_router = APIRouter(prefix="/demo", include_in_schema=False)

PING_S = 15
KParam = Annotated[int, Query(ge=1, le=100)]
ConsentParam = Annotated[Consent, Query(description="As on GET /v1/recommendations.")]


def _sse_event(name: str, data: type[BaseModel]) -> dict[str, Any]:
    """One kind of event of a `text/event-stream`: its name, and its `data` as JSON of a model."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{data.__name__}"},
            },
        },
    }


# The 200 as OpenAPI 3.2 states an event stream (FastAPI's own SSE routes use the same `itemSchema`).
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "An event stream: `recommendations` events, and an `error` or `token_expired` event "
        "before it ends.",
        "content": {
            "text/event-stream": {
                "itemSchema": {
                    "oneOf": [
                        _sse_event("recommendations", RecommendationsResponse),
                        _sse_event("error", ErrorBody),
                        _sse_event("token_expired", ErrorBody),
                    ]
                }
            }
        },
    }
}


STREAM_DESCRIPTION = (
    "A `text/event-stream`: one `recommendations` event at once, then a new one when the speed layer "
    "applies events of this person or session (the same body as GET /v1/recommendations). Not one per "
    "event: events that arrive while the list is being computed get one list, computed after them, and a "
    "list equal to the last one sent (all but its `request_id`) is not sent again. A client that reads "
    "slowly gets the latest list only: a newer one replaces a list not yet sent. Comment "
    "pings keep idle connections open. An `error` event (Redis lost) ends the stream. A browser sends "
    "its session token as `access_token` (its session_id must be given); the stream ends with a "
    "`token_expired` event when the token expires: reconnect with a new one.\n\n"
    "**WebSocket**: `GET /v1/stream/recommendations/ws` with the same query parameters and the same "
    "auth (`X-API-Key` or `Authorization: Bearer` header, or `access_token`) sends the same events as "
    'text messages `{"event": "recommendations" | "error" | "token_expired", "data": {...}}`, `data` '
    "being the JSON object of the SSE event, and closes after an `error` or `token_expired`. A refused "
    "handshake gets this route's 401, 403 or 422 with its error body; messages from the client are ignored."
)


@router.get(
    "/recommendations",
    summary="Recommendations pushed when the speed layer changes them (SSE; WebSocket beside it)",
    description=STREAM_DESCRIPTION,
    response_class=EventSourceResponse,
    responses=SSE_RESPONSE,
)
async def stream_recommendations(
    state: StateDep,
    push: PushDep,
    grant: Annotated[Grant, PersonRecsRead],
    user_id: IdParam = None,
    anonymous_id: IdParam = None,
    session_id: IdParam = None,
    k: KParam = 10,
    consent: ConsentParam = DEFAULT_CONSENT,
) -> EventSourceResponse:
    stream = _stream(state, push, grant, user_id, anonymous_id, session_id, k, consent, transport="sse")

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for name, data in _events(push, stream, grant):
            yield {"event": name, "data": data}

    return EventSourceResponse(
        events(), ping=PING_S, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@ws_router.websocket("/recommendations/ws")
async def stream_recommendations_ws(
    websocket: WebSocket,
    state: StateDep,
    push: PushDep,
    user_id: IdParam = None,
    anonymous_id: IdParam = None,
    session_id: IdParam = None,
    k: KParam = 10,
    consent: ConsentParam = DEFAULT_CONSENT,
    access_token: Annotated[str | None, Query()] = None,
) -> None:
    """The stream's events as JSON text messages (documented in the SSE route's description)."""
    try:
        presented = key_from_headers(websocket.headers.get("x-api-key"), websocket.headers.get("authorization"))
        grant = authorize(state.settings, presented or access_token, "recs:read")
        stream = _stream(state, push, grant, user_id, anonymous_id, session_id, k, consent, transport="websocket")
    except ApiError as exc:
        await _refuse(websocket, exc)
        return
    await websocket.accept()

    async def send() -> None:
        async for name, data in _events(push, stream, grant):
            await websocket.send_text(f'{{"event":"{name}","data":{data}}}')
        await websocket.close()

    async def until_disconnected() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    tasks = [asyncio.create_task(send()), asyncio.create_task(until_disconnected())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        push.close(stream)
        await asyncio.gather(*tasks, return_exceptions=True)


def _stream(
    state: ServingState,
    push: Fanout,
    grant: Grant,
    user_id: str | None,
    anonymous_id: str | None,
    session_id: str | None,
    k: int,
    consent: Consent,
    transport: str,
) -> LiveStream:
    """Check whom the stream is for (before the response starts: a refusal is an HTTP error); the stream."""
    if user_id is None and anonymous_id is None:
        raise ApiError(
            422,
            "invalid_request",
            "give user_id or anonymous_id",
            errors=[FieldError(field="user_id", reason="user_id or anonymous_id is required")],
        )
    grant.check_person(user_id, anonymous_id, session_id)

    req = RecRequest(user_id, anonymous_id, session_id, k, Context.home.value, None, consent)

    async def compute() -> PushedList:
        # As GET /v1/recommendations computes and encodes it (in the worker's push helper, where it is up);
        # logged as an impression once sent.
        helper = push.helper
        result, body = await helper.list_for(state, req) if helper is not None else recommend_body(state, req)
        return PushedList(
            body.decode(),
            content=(result.model_version, result.variant, result.degraded, result.items),  # all but request_id
            on_sent=lambda: log_served(state, req, result),
        )

    people = [p for p in (user_id, anonymous_id) if p]
    # Streams of equal requests (a person's tabs) share each computation.
    return LiveStream(stream_keys(people, session_id), compute, transport, request=req)


async def _events(push: Fanout, stream: LiveStream, grant: Grant) -> AsyncIterator[tuple[str, str]]:
    """Open the stream on the worker's fan-out and give its (event name, JSON data) until it ends: its lists,
    then an `error` or `token_expired`. Opened here, by the response, so that whatever ends it closes it."""
    push.open(stream)
    try:
        while True:
            try:
                pushed = await asyncio.wait_for(stream.next(), timeout=grant.seconds_left(time.time()))
            except TimeoutError:
                expired = ErrorBody(error="token_expired", message="the session token expired; reconnect with a new one")
                yield "token_expired", expired.model_dump_json(exclude_none=True)
                return
            pushed.mark_sent()
            yield "recommendations", pushed.body
    except StreamEnded as ended:
        yield "error", ended.error.model_dump_json(exclude_none=True)
    finally:
        push.close(stream)


async def _refuse(websocket: WebSocket, exc: ApiError) -> None:
    """Answer a refused handshake as the HTTP routes would (status and error body), where the server can."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = exc.body.model_dump(exclude_none=True)
        await websocket.send_denial_response(JSONResponse(body, status_code=exc.status, headers=exc.headers))
    else:
        await websocket.close(code=status.WS_1008_POLICY_VIOLATION, reason=exc.body.error)


@demo_router.get("/catalog", dependencies=[Depends(demo_access)])
def demo_catalog(state: StateDep, per_category: Annotated[int, Query(ge=1, le=100)] = 12) -> dict[str, Any]:
    """The storefront's grid: in-stock items grouped by category, a few per category."""
    return {"categories": _grouped(state, per_category)}


@demo_router.post("/token", response_model=None)
async def demo_token(settings: SettingsDep, key: DemoKey, body: TokenRequest) -> TokenResponse | Response:
    """The page's session token, issued with the demo's key (204 with auth off: the page needs none).
    Anonymous only: the demo has no login, so it never vouches for a user id."""
    if not settings.api.keys:
        return Response(status_code=204)
    if body.user_id is not None:
        raise ApiError(
            422,
            "invalid_request",
            "the demo issues tokens for devices only",
            errors=[FieldError(field="user_id", reason="not accepted by the demo")],
        )
    return issue_token(settings, held_scopes(settings, key), body)


def _grouped(state: ServingState, per_category: int) -> list[dict[str, Any]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in state.lake.read_catalog().to_pylist():
        if row.get("in_stock") is False:
            continue
        category = row.get("category") or UNCATEGORISED
        shelf = grouped.setdefault(category, [])
        if len(shelf) < per_category:
            shelf.append(
                {
                    "item_id": row["item_id"],
                    "title": row.get("title") or row["item_id"],
                    "category": category,
                    "price": float(row.get("price") or 0.0),
                    "promoted": bool(row.get("promoted")),
                }
            )
    return [{"category": c, "items": grouped[c]} for c in sorted(grouped)]


class DemoFiles(StaticFiles):
    """The storefront's files (a mount, which takes no dependencies), behind demo_router's key check."""

    def __init__(self, settings: Settings, directory: Path) -> None:
        super().__init__(directory=directory, html=True)
        self.settings = settings

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            try:
                presented = key_from_headers(headers.get("x-api-key"), headers.get("authorization"))
                check_scope(self.settings, demo_key(self.settings, presented), DEMO_SCOPE)
            except ApiError as exc:
                response = await api_error_handler(Request(scope), exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
