"""DELETE /v1/users/{user_id}: erase a user's live state now and queue the lake erasure (GDPR)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import redis
from fastapi import APIRouter, Path

from common.ids import Id
from serving.api.deps import Admin, StateDep
from serving.core.erasure import erase_person
from serving.core.errors import ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import ErasureResponse

router = APIRouter(prefix="/v1/users", tags=["users"], responses=ERROR_RESPONSES)


@router.delete(
    "/{user_id}",
    summary="Erase a user",
    description=(
        "Deletes the Redis state of the user and of the devices linked to them (sessions, history, "
        "vector deltas, aliases, dedup markers), deletes the event-stream entries naming them, and "
        "tombstones their ids so that later events naming them are dropped; queues the erasure of their "
        "events and impressions in the lake for the next batch run. Until a model trained without them "
        "serves, their batch vector is ignored: later requests treat them as new."
    ),
    response_model=ErasureResponse,
    dependencies=[Admin],
    responses={503: {"model": ErrorBody, "description": "Redis is unreachable; the erasure may be partial and nothing was queued: retry."}},
)
def erase_user(
    state: StateDep, user_id: Annotated[Id, Path()]
) -> ErasureResponse:
    at = datetime.now(UTC)
    try:
        erased = erase_person(state.redis.client, state.settings, user_id)
    except redis.RedisError as exc:
        state.redis.failed(exc)
        raise ApiError(
            503, "redis_unavailable", "Redis is unreachable; retry", headers={"Retry-After": "5"}
        ) from None
    queued = state.lake.queue_erasure(user_id, requested_at=at)
    state.erased.add(user_id, at)
    return ErasureResponse(
        user_id=user_id,
        devices_erased=len(erased.ids) - 1,
        redis_keys_deleted=erased.keys_deleted,
        stream_entries_deleted=erased.stream_entries_deleted,
        lake_erasure_queued=queued,
    )
