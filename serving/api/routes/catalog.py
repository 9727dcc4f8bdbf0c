"""PUT /v1/catalog/items: stock, price and promotion changes that take effect at once."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Body

from common.catalog import ItemUpdate
from common.catalog_state import apply_item_updates
from serving.api.deps import Admin, StateDep
from serving.core.errors import BODY_ERROR_RESPONSES, ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import CatalogUpdateResponse

router = APIRouter(prefix="/v1/catalog", tags=["catalog"], responses=ERROR_RESPONSES)

EXAMPLES = {
    "stock_and_promotion": {
        "summary": "One item sold out, another promoted at a new price",
        "value": [
            {"item_id": "sku-123", "in_stock": False},
            {"item_id": "sku-456", "promoted": True, "price": 49.9},
        ],
    }
}


@router.put(
    "/items",
    summary="Upsert live item fields (batch)",
    description=(
        "Partial updates; an unknown item is added. Stock and promotion live in Redis sets that every "
        "request reads, so they apply to the very next request on every worker; titles, prices and "
        "categories reach the other workers over the catalog pub/sub channel."
    ),
    response_model=CatalogUpdateResponse,
    dependencies=[Admin],
    responses={
        **BODY_ERROR_RESPONSES,
        503: {"model": ErrorBody, "description": "Redis is unreachable; nothing was changed."},
    },
)
def put_items(
    state: StateDep,
    updates: Annotated[list[ItemUpdate], Body(openapi_examples=EXAMPLES, min_length=1, max_length=5000)],
) -> CatalogUpdateResponse:
    try:
        apply_item_updates(state.redis.client, updates)
    except redis.RedisError as exc:
        state.redis.failed(exc)
        raise ApiError(
            503, "redis_unavailable", "Redis is unreachable; retry", headers={"Retry-After": "5"}
        ) from None
    state.apply_catalog(updates)
    return CatalogUpdateResponse(
        updated=len(updates),
        out_of_stock=[u.item_id for u in updates if u.in_stock is False],
        promoted=[u.item_id for u in updates if u.promoted],
    )
