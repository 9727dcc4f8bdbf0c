"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Response

from serving.api.deps import StateDep
from serving.core import metrics
from serving.schemas import Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: a model is loaded and Redis answers",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; the body says which part is missing."}},
)
def readyz(state: StateDep, response: Response) -> Readiness:
    model = state.models.current
    redis_error = None
    try:
        state.redis.client.ping()
    except redis.RedisError as exc:
        redis_error = f"{exc.__class__.__name__}: {exc}"
    body = Readiness(
        ready=model is not None and redis_error is None,
        model_version=model.version if model else None,
        model_error=state.models.last_error if model is None else None,
        redis="down" if redis_error else "up",
        redis_error=redis_error,
    )
    if not body.ready:
        response.status_code = 503
    return body


@router.get("/metrics", summary="Prometheus metrics (all workers)", response_class=Response)
def prometheus_metrics(state: StateDep) -> Response:
    try:
        state.stream_lag.read(state)  # refreshes the lag gauge
    except redis.RedisError:
        pass  # the gauge keeps its last value; the fallback counter shows Redis trouble
    served = state.models.current
    metrics.set_model_age(served.artifacts.manifest.cutoff if served is not None else None)
    state.drift.refresh(state)  # the served version's drift gauges, from the registry
    if state.bandit is not None:
        try:
            state.bandit.export(state.redis.client)  # the posteriors as the speed layer left them now
        except redis.RedisError:
            pass
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
