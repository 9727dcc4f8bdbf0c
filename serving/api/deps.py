"""Typed dependencies for route handlers: settings, the serving state, and scope checks (keys, session tokens)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.requests import HTTPConnection
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from common.events import FieldError
from common.settings import Scope, Settings
from serving.core.auth import Grant, authorize, check_scope, key_from_headers
from serving.core.errors import ApiError
from serving.core.push import Fanout
from serving.core.state import ServingState

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key from RECS_API__KEYS.")
_bearer = HTTPBearer(auto_error=False, description="The same API key, or a session token, as a bearer token.")
_token_query = APIKeyQuery(
    name="access_token",
    scheme_name="SessionToken",
    auto_error=False,
    description="A session token (POST /v1/tokens) where no header can go: EventSource, sendBeacon.",
)


# Dependencies and the hot routes are `async def` though they never await: a plain `def` runs in
# FastAPI's thread pool, and tens of request threads taking turns on the GIL cost more (and
# stretch the tail) than running each request to completion on the event loop.
# They take an HTTPConnection, which FastAPI hands to WebSocket routes too.
async def get_state(connection: HTTPConnection) -> ServingState:
    return serving_state(connection)


def serving_state(connection: HTTPConnection) -> ServingState:
    """The worker's state, for a hot route to read itself: StateDep costs FastAPI a resolution per request."""
    state: ServingState = connection.app.state.serving
    return state


async def app_settings(connection: HTTPConnection) -> Settings:
    """The settings `create_app` was built with (the environment's, or a test's)."""
    settings: Settings = connection.app.state.settings
    return settings


async def get_push(connection: HTTPConnection) -> Fanout:
    push: Fanout = connection.app.state.push
    return push


StateDep = Annotated[ServingState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
PushDep = Annotated[Fanout, Depends(get_push)]


ApiKeyHeader = Annotated[str | None, Security(_api_key)]
BearerHeader = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
TokenQuery = Annotated[str | None, Security(_token_query)]


async def security_values(request: Request) -> tuple[str | None, HTTPAuthorizationCredentials | None, str | None]:
    """What the three security schemes read from a request (the key header, the bearer, the query token),
    in the order the scope checks below take them: for a PreparedRoute's resolver (serving/api/prepared.py)."""
    return await _api_key(request), await _bearer(request), await _token_query(request)


def _credential(x_api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    return key_from_headers(x_api_key, f"Bearer {bearer.credentials}" if bearer else None)


async def presented_key(x_api_key: ApiKeyHeader = None, bearer: BearerHeader = None) -> str | None:
    """The credential of the request's headers, if any."""
    return _credential(x_api_key, bearer)


PresentedKey = Annotated[str | None, Depends(presented_key)]


# The scope checks below take the security schemes and the app's settings themselves rather than through
# SettingsDep and PresentedKey: FastAPI resolves each nested dependency anew on every request, and the
# checks guard every route. The schemes stay dependencies so that the OpenAPI document names them.
def require(scope: Scope) -> Any:
    """A dependency that lets the request through only with a key holding `scope` (or with auth off)."""

    async def dependency(
        connection: HTTPConnection, x_api_key: ApiKeyHeader = None, bearer: BearerHeader = None
    ) -> None:
        check_scope(connection.app.state.settings, _credential(x_api_key, bearer), scope)

    return Depends(dependency)  # typed Any: FastAPI's `dependencies=[...]` wants its private Depends class


def require_for_person(scope: Scope) -> Any:
    """As `require`, or with a session token holding `scope` (header or `access_token` query); the route
    checks the returned Grant against the person and session it acts for."""

    async def dependency(
        connection: HTTPConnection,
        x_api_key: ApiKeyHeader = None,
        bearer: BearerHeader = None,
        access_token: TokenQuery = None,
    ) -> Grant:
        return authorize(connection.app.state.settings, _credential(x_api_key, bearer) or access_token, scope)

    return Depends(dependency)


RecsRead = require("recs:read")
Admin = require("admin")
# The routes of one person, which a browser calls with its session token.
PersonEventsWrite = require_for_person("events:write")
PersonRecsRead = require_for_person("recs:read")


async def single_valued_query(request: Request) -> None:
    """Refuse a query parameter given twice: no route takes a list, and which value counts would be a guess."""
    counts = Counter(name for name, _ in request.query_params.multi_items())
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise ApiError(
            422,
            "invalid_request",
            f"invalid parameter(s): {', '.join(repeated)}",
            errors=[FieldError(field=name, reason="given more than once") for name in repeated],
        )


# For the routers of routes with query parameters (their OpenAPI declares the 422).
SingleQueryValues = Depends(single_valued_query)
