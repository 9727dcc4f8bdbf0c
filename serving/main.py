"""The FastAPI app factory: routers, error shapes, CORS, latency metrics, and the lifespan that loads the model once.

Run it with `recs serve` (uvicorn, N workers) or `uvicorn serving.main:create_app --factory`.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.settings import Settings, get_settings
from serving.api.routes import admin, catalog, events, health, items, recommendations, stream, tokens, users
from serving.core import metrics
from serving.core.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    internal_error_handler,
    validation_error_handler,
)
from serving.core.limits import BodySizeLimit
from serving.core.push import Fanout, InFlight
from serving.core.push_helper import PushHelper
from serving.core.state import ServingState, single_threaded_blas

STATIC_DIR = Path(__file__).resolve().parent / "static"  # the demo storefront

DESCRIPTION = """
Real-time product recommendations: the batch ALS model merged with the speed layer's live
state at request time, ranked by LightGBM, filtered by business rules.

**Auth.** Send an API key as `X-API-Key` (or `Authorization: Bearer`). Scopes: `events:write`
(storefront events), `recs:read` (recommendations, similar items), `admin` (models, catalog,
erasure). With no keys configured (`RECS_API__KEYS` unset) auth is off: the embedded demo.

**Session tokens** let a browser call the routes of its own session without holding a key:
the storefront's server gets one from `POST /v1/tokens` with its key and hands it to the page,
which sends it as `Authorization: Bearer <token>`, or as `?access_token=` where no header can go
(EventSource, sendBeacon). Expired (`token_expired`) or forged (`invalid_token`) tokens get 401;
a token used for another session or person gets 403 `token_scope`.
"""


class LatencyMiddleware:
    """Observe each request's latency under its route template (not the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        # Pushes wait for the worker's requests in flight; a stream leaves them when its response starts.
        push: Fanout | None = getattr(scope["app"].state, "push", None)
        in_flight: InFlight | None = push.requests if push is not None else None
        if in_flight is not None:
            in_flight.enter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, in_flight
            if message["type"] == "http.response.start":
                status = message["status"]
                if in_flight is not None:
                    in_flight.leave()
                    in_flight = None
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if in_flight is not None:  # no response started
                in_flight.leave()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.REQUEST_LATENCY.labels(scope["method"], template, f"{status // 100}xx").observe(
                time.perf_counter() - start
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` (tests) override the environment's for every dependency too."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        single_threaded_blas()
        state = ServingState.start(settings)
        app.state.serving = state
        app.state.push = Fanout(settings.redis.effective_url, PushHelper(settings))
        try:
            yield
        finally:
            await app.state.push.aclose()
            state.close()  # flushes buffered impressions to the lake
            metrics.mark_worker_exit(os.getpid())

    app = FastAPI(
        title="Lambdarec API",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "events", "description": "Storefront events into the stream."},
            {"name": "recommendations", "description": "Ranked lists for a person."},
            {"name": "tokens", "description": "Session tokens for browsers."},
            {"name": "items", "description": "Item-to-item similarity."},
            {"name": "catalog", "description": "Live item fields (stock, price, promotion)."},
            {"name": "users", "description": "Erasure and consent (GDPR)."},
            {"name": "admin", "description": "Model versions."},
            {"name": "operations", "description": "Health, readiness, metrics."},
        ],
    )
    app.state.settings = settings  # what SettingsDep hands out (dependency_overrides would cost a
    # signature inspection per dependency per request)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)
    # Middleware added first runs innermost: the 413 still carries CORS headers and is timed.
    app.add_middleware(BodySizeLimit, max_bytes=settings.api.max_body_bytes)
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["X-API-Key", "Authorization", "Content-Type"],
        )
    app.add_middleware(LatencyMiddleware)
    for module in (events, recommendations, stream, tokens, items, catalog, users, admin, health):
        app.include_router(module.router)
    app.include_router(stream.ws_router)
    app.include_router(stream.demo_router)  # before the mount: /demo/catalog is an endpoint, the rest files
    app.mount("/demo", stream.DemoFiles(settings, STATIC_DIR), name="demo")
    return app
