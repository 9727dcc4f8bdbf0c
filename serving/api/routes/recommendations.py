"""GET /v1/recommendations: the merged, ranked list for a person, logged as an impression."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.dependencies.models import Dependant
from pydantic import BaseModel, Field

from common.events import DEFAULT_CONSENT, Consent, FieldError
from common.ids import Id
from serving.api.deps import (
    PersonRecsRead,
    SingleQueryValues,
    security_values,
    serving_state,
    single_valued_query,
)
from serving.api.prepared import PreparedRoute, query_model, resolved_by
from serving.core import drift
from serving.core.auth import Grant
from serving.core.errors import PERSON_ERROR_RESPONSES, ApiError
from serving.core.impressions import Impression
from serving.core.load import shed_for, waited_s
from serving.core.recommender import RecRequest, RecResult
from serving.core.response_body import recommend_body
from serving.core.state import ServingState
from serving.schemas import Context, RecommendationsResponse

router = APIRouter(
    prefix="/v1/recommendations",
    tags=["recommendations"],
    responses=PERSON_ERROR_RESPONSES,
    dependencies=[SingleQueryValues],
    route_class=PreparedRoute,
)

IdParam = Annotated[Id | None, Query()]


class RecommendationsQuery(BaseModel):
    """The route's query parameters as one model: FastAPI validates it in one call, where it inspects and
    validates each separately declared parameter on every request. The OpenAPI document lists the fields."""

    user_id: Annotated[Id | None, Field(examples=["u-7"])] = None
    anonymous_id: Annotated[Id | None, Field(examples=["device-42"])] = None
    session_id: Annotated[Id | None, Field(examples=["s-1"])] = None
    k: Annotated[int, Field(ge=1, le=100, description="How many items.")] = 10
    context: Annotated[Context, Field(description="Where the list is shown.")] = Context.home
    item_id: Annotated[Id | None, Field(description="The product on the page (context=product).")] = None
    consent: Annotated[
        Consent, Field(description="The person's consent, as on their events; default `personalisation`.")
    ] = DEFAULT_CONSENT


async def _arguments(request: Request, _: Dependant) -> dict[str, Any]:
    """get_recommendations' arguments as FastAPI resolves them, in its order: the router's single-value check,
    the scope (key or session token), then the query (serving/api/prepared.py)."""
    await single_valued_query(request)
    grant = await PersonRecsRead.dependency(request, *await security_values(request))
    # The query model validated directly: FastAPI's per-field lookups would cost ~100 us more a request.
    return {"request": request, "grant": grant, "query": query_model(RecommendationsQuery, request)}


@router.get(
    "",
    summary="Recommendations for a person",
    description=(
        "Give `user_id` (logged in) or `anonymous_id` (device), or both. `context=product` needs `item_id` "
        "(the product on the page); `context=cart` draws on the cart. The answer never fails for a "
        "missing Redis or model, or an overloaded worker: it says why in `degraded`. Send `request_id` back "
        "as `rec_request_id` on click events to attribute them. With a session token, `session_id` must be "
        "the token's and the person its device or user. Send `consent` as the page's events carry it: below "
        "`personalisation` the list is non-personal (trending and new arrivals; nothing of the person is used, "
        "and `degraded` says so), below `analytics` the list is not logged as an impression."
    ),
    response_model=RecommendationsResponse,
)
@resolved_by(_arguments)
async def get_recommendations(
    request: Request, grant: Annotated[Grant, PersonRecsRead], query: Annotated[RecommendationsQuery, Query()]
) -> Response:
    if query.user_id is None and query.anonymous_id is None:
        raise ApiError(
            422,
            "invalid_request",
            "give user_id or anonymous_id",
            errors=[FieldError(field="user_id", reason="user_id or anonymous_id is required")],
        )
    grant.check_person(query.user_id, query.anonymous_id, query.session_id)
    if query.context is Context.product and query.item_id is None:
        raise ApiError(
            422,
            "invalid_request",
            "context=product needs item_id",
            errors=[FieldError(field="item_id", reason="required when context is product")],
        )
    req = RecRequest(
        query.user_id,
        query.anonymous_id,
        query.session_id,
        query.k,
        query.context.value,
        query.item_id,
        query.consent,
    )
    state = serving_state(request)
    result, body = recommend_body(state, req, shed_for(state.settings.api, waited_s(request.scope)))
    log_served(state, req, result)
    return Response(body, media_type="application/json")


def log_served(state: ServingState, req: RecRequest, result: RecResult) -> None:
    """Log a list shown to the person as an impression (and offer it to drift monitoring)."""
    if req.consent.allows(Consent.ANALYTICS):  # an impression names the person, as the lake's events do
        state.impressions.log(_impression(req, result))
        drift.offer(state, req, result)


def _impression(req: RecRequest, result: RecResult) -> Impression:
    return Impression(
        request_id=result.request_id,
        served_at=datetime.now(UTC),
        person_id=req.person_id,
        user_id=req.user_id,
        anonymous_id=req.anonymous_id,
        session_id=req.session_id,
        context=req.context,
        variant=result.variant,
        model_version=result.model_version,
        degraded=result.degraded,
        items=[i.item_id for i in result.items],
        scores=[i.score for i in result.items],
        sources=["+".join(i.sources) for i in result.items],
    )
