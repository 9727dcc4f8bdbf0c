"""Model administration: list registry versions, activate one (every worker and the speed layer follow)."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Path

from common.registry import RegistryError, publish_model_event
from serving.api.deps import Admin, StateDep
from serving.core.errors import ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import ActivateResponse, ModelInfo, ModelsResponse

router = APIRouter(prefix="/v1/admin/models", tags=["admin"], dependencies=[Admin], responses=ERROR_RESPONSES)


@router.get("", summary="Model versions in the registry", response_model=ModelsResponse)
def list_models(state: StateDep) -> ModelsResponse:
    current = state.registry.current()
    serving = state.models.current.version if state.models.current else None
    models = [
        ModelInfo(
            version=m.version,
            created_at=m.created_at,
            cutoff=m.cutoff,
            engine=m.engine,
            status=m.status,
            decision=m.decision,
            ranker_unused=m.ranker_unused,
            metrics=m.metrics,
            active=m.version == current,
            serving=m.version == serving,
        )
        for m in state.registry.manifests()
    ]
    return ModelsResponse(current=current, serving=serving, models=models)


@router.post(
    "/{version}/activate",
    summary="Make a version the serving one",
    description=(
        "Loads the version in this worker first (a broken version is refused and nothing changes), then "
        "switches the registry's CURRENT and publishes a ModelEvent so the other workers and the speed "
        "layer follow. Requests in flight finish on the model they started with."
    ),
    response_model=ActivateResponse,
    responses={
        404: {"model": ErrorBody, "description": "No such version."},
        409: {"model": ErrorBody, "description": "The version cannot be loaded."},
    },
)
def activate(state: StateDep, version: str = Path(examples=["20250610T020000Z"])) -> ActivateResponse:
    if version not in state.registry.versions():
        raise ApiError(404, "unknown_version", f"model version {version!r} is not in the registry")
    state.reload_model(version)
    loaded = state.models.current
    if loaded is None or loaded.version != version:
        raise ApiError(409, "load_failed", state.models.last_error or f"could not load {version}")
    try:
        event = state.registry.activate(version, kind="activated")
    except RegistryError as exc:
        raise ApiError(409, "activation_refused", str(exc)) from None
    try:
        heard = publish_model_event(state.redis.client, event)
    except redis.RedisError:
        heard = 0  # other workers catch up with CURRENT when their listener reconnects
    return ActivateResponse(
        version=version, previous=event.previous, serving=loaded.version, notified_workers=heard
    )
