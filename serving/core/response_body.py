"""A recommendation request's list and its JSON body, as GET /v1/recommendations answers it and a live
stream pushes it (in the worker, or in its push helper: serving/core/push_helper.py)."""

from __future__ import annotations

import msgspec

from serving.core.load import Shed
from serving.core.metrics import StageClock
from serving.core.recommender import RecRequest, RecResult, recommend
from serving.core.state import ServingState

# The body is RecommendationsResponse (the OpenAPI document's), encoded by msgspec straight from the
# recommender's dataclasses: building and dumping the pydantic models cost ~35 us a request, this ~6.
_ENCODER = msgspec.json.Encoder()


def recommend_body(state: ServingState, req: RecRequest, shed: Shed = Shed.NOTHING) -> tuple[RecResult, bytes]:
    """The list for a request and its JSON body; not logged (a pushed list is logged once sent). `shed`:
    what an overloaded worker leaves out (serving/core/load.py)."""
    clock = StageClock()
    result = recommend(state, req, clock=clock, shed=shed)
    body = _ENCODER.encode(
        {
            "request_id": result.request_id,
            "model_version": result.model_version,
            "variant": result.variant,
            "degraded": result.degraded,
            "experiments": {"recs": result.variant},
            "items": result.items,  # dataclasses with RecommendedItem's fields (a test holds them equal)
        }
    )
    clock.lap("serialisation")
    clock.observe()
    return result, body
