"""Event ingestion: validate with the shared schema, append to the stream, report per event."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import redis
from fastapi import APIRouter, Body, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse

from common.events import Event, EventError, FieldError, validate_events
from common.stream import append_events
from serving.api.deps import PersonEventsWrite, StateDep, security_values, serving_state
from serving.api.prepared import NotPrepared, PreparedRoute, json_body, resolved_by
from serving.core import metrics
from serving.core.auth import Grant
from serving.core.errors import BODY_ERROR_RESPONSES, PERSON_ERROR_RESPONSES, ApiError, ErrorBody
from serving.schemas import EVENT_EXAMPLES, EventResult, EventsBody, EventsRejected, EventsResponse

router = APIRouter(prefix="/v1/events", tags=["events"], route_class=PreparedRoute)

RETRY_AFTER_S = "5"
# The 202 body (EventsResponse, as documented) encoded straight from plain values: building and dumping
# an EventResult model per event cost more than the rest of the answer.
_ENCODER = msgspec.json.Encoder()


async def _arguments(request: Request, _: Dependant) -> dict[str, Any]:
    """post_events' arguments as FastAPI resolves them, in its order: the body parsed first, then the state
    and the scope (key or session token). A body that is not a JSON object or array is left to FastAPI,
    whose 422 says what it should be (serving/api/prepared.py)."""
    payload = await json_body(request)
    if not isinstance(payload, dict | list):
        raise NotPrepared
    grant = await PersonEventsWrite.dependency(request, *await security_values(request))
    return {"state": serving_state(request), "grant": grant, "payload": payload}


@router.post(
    "",
    status_code=202,
    summary="Send one event or a batch",
    description=(
        "The body is one event or a JSON array of events (the `Event` contract of `common/events.py`). "
        "`consent` (`none`, `analytics`, `personalisation`; default `personalisation`, as before the field "
        "existed) says what the speed layer and the lake may keep of it (`Consent` below; README, 'Consent'). "
        "Good events are appended to the stream even when others in the batch are rejected; then the answer "
        "is 422 and `results` names each bad event's fields. 503 with Retry-After when the speed layer lags "
        "more than `api.max_stream_lag` entries behind, or Redis is unreachable. With a session token, every "
        "event must carry the token's session_id and anonymous_id (and no other user_id), else nothing is kept."
    ),
    response_model=EventsResponse,
    responses={
        **PERSON_ERROR_RESPONSES,
        **BODY_ERROR_RESPONSES,
        413: {
            "model": ErrorBody,
            "description": "The body is over `api.max_body_bytes`, or holds more than "
            "`api.max_batch` events.",
        },
        422: {
            "model": EventsRejected | ErrorBody,
            "description": "Some events were rejected and the good ones kept (`results` says which), or the "
            "body is not an event or a batch of them.",
        },
        503: {
            "model": ErrorBody,
            "description": "Backpressure or Redis down; retry after the header's seconds.",
        },
    },
)
@resolved_by(_arguments)
async def post_events(
    state: StateDep,
    grant: Annotated[Grant, PersonEventsWrite],
    payload: Annotated[EventsBody, Body(openapi_examples=EVENT_EXAMPLES)],
) -> Response:
    payloads = payload if isinstance(payload, list) else [payload]
    max_batch = state.settings.api.max_batch
    if not payloads:
        raise ApiError(
            422, "empty_batch", "the batch holds no events", errors=[FieldError(field="body", reason="empty")]
        )
    if len(payloads) > max_batch:
        raise ApiError(
            413, "batch_too_large", f"a batch holds at most {max_batch} events, got {len(payloads)}"
        )
    _refuse_under_backpressure(state)

    accepted, rejected = validate_events(payloads)
    for event in accepted:  # a token writes for its own session only: refuse the batch before any of it lands
        grant.check_person(event.user_id, event.anonymous_id, event.session_id)
    stamped = [event.received() for event in accepted]
    try:
        stream_ids = append_events(
            state.redis.client,
            stamped,
            state.settings.redis.stream,
            state.settings.redis.stream_retention_ms,
            trim=state.stream_trim.due(),
        )
    except redis.RedisError as exc:
        state.redis.failed(exc)
        raise _unavailable() from None

    metrics.EVENTS.labels(outcome="accepted").inc(len(stamped))
    metrics.EVENTS.labels(outcome="rejected").inc(len(rejected))
    if rejected:
        return _rejected(_results(len(payloads), stamped, stream_ids, rejected), accepted=len(stamped))
    results = [
        {"index": index, "event_id": event.event_id, "status": "accepted", "stream_id": stream_id}
        for index, (event, stream_id) in enumerate(zip(stamped, stream_ids, strict=True))
    ]
    body = {"accepted": len(stamped), "rejected": 0, "results": results}
    return Response(_ENCODER.encode(body), status_code=202, media_type="application/json")


def _results(
    count: int, stamped: list[Event], stream_ids: list[str], rejected: list[EventError]
) -> list[EventResult]:
    """Each event's outcome, in the body's order, when some were rejected."""
    results: list[EventResult] = []
    accepted_iter = iter(zip(stamped, stream_ids, strict=True))
    rejected_by_index = {err.index: err for err in rejected}
    for index in range(count):
        if index in rejected_by_index:
            err = rejected_by_index[index]
            results.append(
                EventResult(index=index, event_id=err.event_id, status="rejected", errors=err.errors)
            )
        else:
            event, stream_id = next(accepted_iter)
            results.append(
                EventResult(index=index, event_id=event.event_id, status="accepted", stream_id=stream_id)
            )
    return results


def _rejected(results: list[EventResult], accepted: int) -> JSONResponse:
    """The 422 of a batch with rejected events, in the error shape."""
    errors = [
        FieldError(field=f"{result.index}.{error.field}", reason=error.reason)
        for result in results
        for error in result.errors or []
    ]
    body = EventsRejected(
        error="events_rejected",
        message=f"{len(results) - accepted} of {len(results)} events rejected; the others were kept",
        errors=errors,
        accepted=accepted,
        rejected=len(results) - accepted,
        results=results,
    )
    return JSONResponse(body.model_dump(exclude_none=True), status_code=422)


def _refuse_under_backpressure(state: StateDep) -> None:
    try:
        lag = state.stream_lag.read(state)
    except redis.RedisError as exc:
        state.redis.failed(exc)
        raise _unavailable() from None
    limit = state.settings.api.max_stream_lag
    if lag > limit:
        metrics.EVENTS.labels(outcome="refused_backpressure").inc()
        raise ApiError(
            503,
            "backpressure",
            f"the speed layer is {lag} events behind (limit {limit}); retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )


def _unavailable() -> ApiError:
    metrics.EVENTS.labels(outcome="refused_redis_down").inc()
    return ApiError(
        503,
        "stream_unavailable",
        "the event stream (Redis) is unreachable; retry later",
        headers={"Retry-After": RETRY_AFTER_S},
    )
