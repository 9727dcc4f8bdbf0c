"""GET /v1/items/{item_id}/similar: nearest items by ALS item factors (cosine), in stock only."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import redis
from fastapi import APIRouter, Path, Query

from common import redis_keys
from common.ids import Id
from serving.api.deps import RecsRead, SingleQueryValues, StateDep
from serving.core.errors import ERROR_RESPONSES, ApiError, ErrorBody
from serving.core.recommender import REDIS_DOWN
from serving.schemas import SimilarItem, SimilarResponse

router = APIRouter(
    prefix="/v1/items",
    tags=["items"],
    responses=ERROR_RESPONSES,
    dependencies=[SingleQueryValues],
)


@router.get(
    "/{item_id}/similar",
    summary="Items similar to one item",
    description="Brute-force cosine over the ALS item factors (fine to a few hundred thousand items).",
    response_model=SimilarResponse,
    dependencies=[RecsRead],
    responses={
        404: {"model": ErrorBody, "description": "The model does not know the item."},
        503: {"model": ErrorBody, "description": "No model is loaded yet."},
    },
)
async def similar_items(
    state: StateDep,
    item_id: Annotated[Id, Path(examples=["sku-123"])],
    k: Annotated[int, Query(ge=1, le=100)] = 10,
) -> SimilarResponse:
    model = state.models.current
    if model is None:
        raise ApiError(503, "no_model", "no model is loaded yet", headers={"Retry-After": "30"})
    row = model.artifacts.item_index.get(item_id)
    if row is None:
        raise ApiError(404, "unknown_item", f"model {model.version} does not know item {item_id!r}")
    out_of_stock, degraded = _out_of_stock(state)
    scores = model.unit_factors @ model.unit_factors[row]
    scores[row] = -np.inf
    # Over-fetch so that out-of-stock items can be dropped without a second pass.
    n = min(len(scores), k + len(out_of_stock) + 1)
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.argsort(-scores[top], kind="stable")]
    items = []
    for i in top:
        other = model.artifacts.item_ids[i]
        info = state.catalog.get(other)
        if other in out_of_stock or (info is not None and not info.in_stock) or not np.isfinite(scores[i]):
            continue
        items.append(
            SimilarItem(
                item_id=other, score=round(float(scores[i]), 6), category=state.catalog.category(other)
            )
        )
        if len(items) == k:
            break
    return SimilarResponse(item_id=item_id, model_version=model.version, degraded=degraded, items=items)


def _out_of_stock(state: StateDep) -> tuple[set[str], str | None]:
    if not state.redis.available():
        return set(), REDIS_DOWN
    try:
        members = state.redis.client.smembers(redis_keys.OUT_OF_STOCK)
    except redis.RedisError as exc:
        state.redis.failed(exc)
        return set(), REDIS_DOWN
    return {m.decode() if isinstance(m, bytes) else str(m) for m in members}, None
