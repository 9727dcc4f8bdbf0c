"""DELETE /v1/users/{user_id}: erase a user's live state now and queue the lake erasure (GDPR);
POST /v1/users/{user_id}/consent: a new consent state, whose withdrawals erase what they no longer allow."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import redis
from fastapi import APIRouter, Path

from common import redis_keys
from common.events import Consent
from common.ids import Id
from serving.api.deps import Admin, StateDep
from serving.core.erasure import erase_person, withdraw_consent
from serving.core.errors import BODY_ERROR_RESPONSES, ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import ConsentChange, ConsentResponse, ErasureResponse

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
        raise _redis_unavailable(state, exc) from None
    queued = state.lake.queue_erasure(user_id, requested_at=at)
    state.erased.add(user_id, at)
    return ErasureResponse(
        user_id=user_id,
        devices_erased=len(erased.ids) - 1,
        redis_keys_deleted=erased.keys_deleted,
        stream_entries_deleted=erased.stream_entries_deleted,
        lake_erasure_queued=queued,
    )


@router.post(
    "/{user_id}/consent",
    summary="Record a consent change",
    description=(
        "The person's new consent state (`none`, `analytics`, `personalisation`), for them and the devices "
        "linked to them. Below `personalisation` it is a withdrawal: their person-level Redis state is "
        "deleted as erasure deletes it (sessions, history, vector deltas, aliases, dedup markers), and "
        "their events received before it that still wait in the stream are applied to aggregates only. "
        "Below `analytics` their events and impressions in the lake are queued for erasure too (the next "
        "batch run applies it) and such events are no longer landed. Their later events follow the "
        "consent they carry. Admin scope: the store's backend, which knows who is signed in, calls it."
    ),
    response_model=ConsentResponse,
    dependencies=[Admin],
    responses={
        **BODY_ERROR_RESPONSES,
        503: {"model": ErrorBody, "description": "Redis is unreachable; the change may be partial: retry."},
    },
)
def change_consent(
    state: StateDep, user_id: Annotated[Id, Path()], change: ConsentChange
) -> ConsentResponse:
    at = datetime.now(UTC)  # the clock that stamps events' received_at
    if change.consent is Consent.PERSONALISATION:  # nothing withdrawn: the events carry the new state
        devices = len(_linked(state, user_id)) - 1
        return ConsentResponse(user_id=user_id, consent=change.consent, devices=devices, redis_keys_deleted=0)
    try:
        withdrawn = withdraw_consent(state.redis.client, state.settings, user_id, change.consent, at.timestamp())
    except redis.RedisError as exc:
        raise _redis_unavailable(state, exc) from None
    queued = None
    if not change.consent.allows(Consent.ANALYTICS):  # GDPR: erase what was processed under it
        queued = state.lake.queue_erasure(user_id, requested_at=at)
        state.erased.add(user_id, at)
    return ConsentResponse(
        user_id=user_id,
        consent=change.consent,
        devices=len(withdrawn.ids) - 1,
        redis_keys_deleted=withdrawn.keys_deleted,
        lake_erasure_queued=queued,
    )


def _linked(state: StateDep, user_id: str) -> tuple[str, ...]:
    try:
        return redis_keys.person_and_devices(state.redis.client, user_id)
    except redis.RedisError as exc:
        raise _redis_unavailable(state, exc) from None


def _redis_unavailable(state: StateDep, exc: redis.RedisError) -> ApiError:
    state.redis.failed(exc)
    return ApiError(503, "redis_unavailable", "Redis is unreachable; retry", headers={"Retry-After": "5"})
