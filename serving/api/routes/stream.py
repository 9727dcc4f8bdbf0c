"""Live recommendations by Server-Sent Events, and the demo storefront: its small catalog endpoint and files.

GET /v1/stream/recommendations subscribes to the speed layer's RECS_CHANNEL; each time the speed
layer says this person's (or session's) state changed, the list is recomputed by the very route
function GET /v1/recommendations runs (same ranking, same impression log) and sent as one event.
A browser's EventSource sends no headers, so it authenticates with its session token in the query.

With `api.demo_key` set the demo's server side presents that key for the page, which then works
with keys configured and never sees the key: it gets session tokens from POST /demo/token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse
from starlette.datastructures import Headers
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from common import redis_keys
from common.events import DEFAULT_CONSENT, Consent, FieldError
from common.messages import RecsChanged
from common.settings import Scope, Settings
from serving.api.deps import PersonRecsRead, PresentedKey, SettingsDep, SingleQueryValues, StateDep
from serving.api.routes.recommendations import IdParam, get_recommendations
from serving.api.routes.tokens import issue_token
from serving.core.auth import Grant, check_scope, held_scopes, key_from_headers
from serving.core.errors import PERSON_ERROR_RESPONSES, ApiError, ErrorBody, api_error_handler
from serving.core.state import ServingState
from serving.schemas import Context, RecommendationsResponse, TokenRequest, TokenResponse

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1/stream",
    tags=["recommendations"],
    responses=PERSON_ERROR_RESPONSES,
    dependencies=[SingleQueryValues],
)
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
POLL_S = 1.0


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


@router.get(
    "/recommendations",
    summary="Recommendations pushed when the speed layer changes them (SSE)",
    description=(
        "A `text/event-stream`: one `recommendations` event at once, then one each time the speed layer "
        "applies an event of this person or session (the same body as GET /v1/recommendations). "
        "Comment pings keep idle connections open. An `error` event (Redis lost) ends the stream. A browser "
        "sends its session token as `access_token` (its session_id must be given); the stream ends with a "
        "`token_expired` event when the token expires: reconnect with a new one."
    ),
    response_class=EventSourceResponse,
    responses=SSE_RESPONSE,
)
async def stream_recommendations(
    request: Request,
    state: StateDep,
    grant: Annotated[Grant, PersonRecsRead],
    user_id: IdParam = None,
    anonymous_id: IdParam = None,
    session_id: IdParam = None,
    k: Annotated[int, Query(ge=1, le=100)] = 10,
    consent: Annotated[Consent, Query(description="As on GET /v1/recommendations.")] = DEFAULT_CONSENT,
) -> EventSourceResponse:
    if user_id is None and anonymous_id is None:
        raise ApiError(
            422,
            "invalid_request",
            "give user_id or anonymous_id",
            errors=[FieldError(field="user_id", reason="user_id or anonymous_id is required")],
        )
    grant.check_person(user_id, anonymous_id, session_id)
    people = {p for p in (user_id, anonymous_id) if p}

    async def compute() -> str:
        body = await get_recommendations(
            state,
            grant,
            user_id=user_id,
            anonymous_id=anonymous_id,
            session_id=session_id,
            k=k,
            context=Context.home,
            consent=consent,
        )
        return bytes(body.body).decode()  # the route's JSON body, as GET /v1/recommendations sends it

    async def events() -> AsyncIterator[dict[str, Any]]:
        client = aioredis.Redis.from_url(state.settings.redis.effective_url, socket_connect_timeout=1.0)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(redis_keys.RECS_CHANNEL)
            yield {"event": "recommendations", "data": await compute()}
            while not await request.is_disconnected():
                if grant.expired(time.time()):
                    expired = ErrorBody(error="token_expired", message="the session token expired; reconnect with a new one")
                    yield {"event": "token_expired", "data": expired.model_dump_json(exclude_none=True)}
                    return
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
                if message is None or not _concerns(message["data"], people, session_id):
                    continue
                # Coalesce a burst (one batch of the speed layer publishes once per person).
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01) is not None:
                    pass
                yield {"event": "recommendations", "data": await compute()}
        except (aioredis.RedisError, OSError) as exc:
            log.warning("recommendation stream ends: %s", exc)
            lost = ErrorBody(error="redis_unavailable", message="Redis is unreachable; reconnect later")
            yield {"event": "error", "data": lost.model_dump_json(exclude_none=True)}
        except asyncio.CancelledError:
            raise
        finally:
            try:
                await pubsub.aclose()
                await client.aclose()
            except Exception:  # the connection may already be gone
                log.debug("closing the stream's Redis connection failed", exc_info=True)

    return EventSourceResponse(
        events(), ping=PING_S, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _concerns(data: bytes | str, people: set[str], session_id: str | None) -> bool:
    try:
        message = RecsChanged.model_validate_json(data)
    except ValueError:
        return False
    if message.person_id in people:
        return True
    return session_id is not None and message.session_id == session_id


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
        category = row.get("category") or "uncategorised"
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
