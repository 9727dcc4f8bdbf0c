"""GET /v1/items/{item_id}/similar: co-visits blended with item-vector similarity (serving/core/similar.py)."""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import APIRouter, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse

from common import redis_keys
from common.ids import Id
from common.speed_state import ItemFlags, covisit_row, item_flags, item_flags_call, with_read_scripts
from serving.api.deps import (
    RecsRead,
    SingleQueryValues,
    StateDep,
    security_values,
    serving_state,
    single_valued_query,
)
from serving.api.prepared import PreparedRoute, declared_params, resolved_by
from serving.core.errors import ERROR_RESPONSES, ApiError, ErrorBody
from serving.core.recommender import REDIS_DOWN
from serving.core.similar import merged_covisits
from serving.core.similar import similar_items as similar
from serving.schemas import SimilarItem, SimilarResponse

router = APIRouter(
    prefix="/v1/items",
    tags=["items"],
    responses=ERROR_RESPONSES,
    dependencies=[SingleQueryValues],
    route_class=PreparedRoute,
)
COVIS_READ = 100  # live co-visits read per request (the batch rows hold as many)


async def _arguments(request: Request, dependant: Dependant) -> dict[str, Any]:
    """similar_items' arguments as FastAPI resolves them, in its order: the router's single-value check, the
    route's scope check, the state, then the path and query parameters (serving/api/prepared.py)."""
    await single_valued_query(request)
    x_api_key, bearer, _ = await security_values(request)  # this route takes no session token
    await RecsRead.dependency(request, x_api_key, bearer)
    return {"state": serving_state(request), **declared_params(request, dependant)}


@router.get(
    "/{item_id}/similar",
    summary="Items similar to one item",
    description=(
        "Co-visits (batch and live) blended with cosine similarity of item vectors: ALS factors, or the "
        "content vector (title, category, brand, price band) of an item new since the model's cutoff. "
        "Each item says which found it (`source`, `reason`). In stock only."
    ),
    response_model=SimilarResponse,
    dependencies=[RecsRead],
    responses={
        404: {"model": ErrorBody, "description": "The item has neither a vector nor co-visits."},
        503: {"model": ErrorBody, "description": "No model is loaded yet."},
    },
)
@resolved_by(_arguments)
async def similar_items(
    state: StateDep,
    item_id: Annotated[Id, Path(examples=["sku-123"])],
    k: Annotated[int, Query(ge=1, le=100)] = 10,
) -> JSONResponse:
    model = state.models.current
    if model is None:
        raise ApiError(503, "no_model", "no model is loaded yet", headers={"Retry-After": "30"})
    out_of_stock, live, degraded = _live_state(state, item_id)

    def excluded(other: str) -> bool:
        info = state.catalog.get(other)
        return other in out_of_stock or (info is not None and not info.in_stock)

    covisits = merged_covisits(model.covis.get(item_id, {}), live)
    found = similar(model, item_id, covisits, excluded, k)
    if found is None:
        raise ApiError(404, "unknown_item", f"model {model.version} does not know item {item_id!r}")
    items = [
        SimilarItem(
            item_id=s.item_id, score=round(s.score, 6), category=state.catalog.category(s.item_id),
            source=s.source, reason=s.reason,
        )  # fmt: skip
        for s in found
    ]
    body = SimilarResponse(item_id=item_id, model_version=model.version, degraded=degraded, items=items)
    return JSONResponse(body.model_dump(mode="json"))  # the documented model, not validated again by FastAPI


def _live_state(state: StateDep, item_id: str) -> tuple[frozenset[str], list[tuple[str, float]], str | None]:
    """The out-of-stock set (the worker's copy, read again when it changed) and the item's live
    co-visits, in one round trip; empty when Redis is down."""
    if not state.redis.available():
        return frozenset(), [], REDIS_DOWN
    known = state.item_flags.flags
    client = state.redis.client
    try:
        flags_reply, row = with_read_scripts(client, lambda: _flags_and_covisits(client, known, item_id))
    except redis.RedisError as exc:
        state.redis.failed(exc)
        return frozenset(), [], REDIS_DOWN
    followers = covisit_row(row, COVIS_READ)
    return item_flags(flags_reply, known, state.item_flags).out_of_stock, list(followers.items()), None


def _flags_and_covisits(client: redis.Redis, known: ItemFlags, item_id: str) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    pipe.execute_command(*item_flags_call(known))
    pipe.execute_command("HGETALL", redis_keys.covisitation(item_id))
    return list(pipe.execute())
