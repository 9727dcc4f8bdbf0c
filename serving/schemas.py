"""Request and response bodies of the public API, with the examples OpenAPI shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from common.events import Consent, Event, FieldError
from common.ids import Id
from serving.core.errors import ErrorBody
from serving.core.tokens import TokenScope


@dataclass(frozen=True)
class DocumentedAs:
    """Annotation: the OpenAPI shows the body as `shown` (its models land in components/schemas), while
    the handler takes it as it is, to validate its parts one by one."""

    shown: Any

    def __get_pydantic_json_schema__(self, _: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(TypeAdapter(self.shown).core_schema)


# One event or a batch: documented as the `Event` contract, validated per event (a batch keeps its good ones).
EventsBody = Annotated[
    dict[str, Any] | list[Any], DocumentedAs(Event | Annotated[list[Event], Field(min_length=1)])
]


class Context(StrEnum):
    home = "home"
    product = "product"
    cart = "cart"


class EventResult(BaseModel):
    index: int
    event_id: str | None = Field(None, description="Absent when the event carried none (or an unusable one).")
    status: Literal["accepted", "rejected"]
    stream_id: str | None = Field(None, description="The stream entry id of an accepted event.")
    errors: list[FieldError] | None = Field(None, description="Each field at fault in a rejected event.")


class EventsResponse(BaseModel):
    accepted: int
    rejected: int
    results: list[EventResult]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "accepted": 1,
                    "rejected": 0,
                    "results": [
                        {
                            "index": 0,
                            "event_id": "0b5c1a52-3f1e-4d7a-9a0e-7f1c2d3e4f50",
                            "status": "accepted",
                            "stream_id": "1718000000000-0",
                        }
                    ],
                }
            ]
        }
    )


class EventsRejected(ErrorBody, EventsResponse):
    """422 when events of the body were rejected: the error shape (`errors` names "<index>.<field>"),
    and each event's outcome, since the good ones were kept."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "events_rejected",
                    "message": "1 of 2 events rejected; the others were kept",
                    "errors": [{"field": "1.event_id", "reason": "Field required"}],
                    "accepted": 1,
                    "rejected": 1,
                    "results": [
                        {
                            "index": 0,
                            "event_id": "0b5c1a52-3f1e-4d7a-9a0e-7f1c2d3e4f50",
                            "status": "accepted",
                            "stream_id": "1718000000000-0",
                        },
                        {
                            "index": 1,
                            "status": "rejected",
                            "errors": [{"field": "event_id", "reason": "Field required"}],
                        },
                    ],
                }
            ]
        }
    )


EVENT_EXAMPLES: dict[str, Any] = {
    "single": {
        "summary": "One view",
        "value": {
            "event_id": "0b5c1a52-3f1e-4d7a-9a0e-7f1c2d3e4f50",
            "event_type": "view",
            "ts": "2025-06-10T12:00:00Z",
            "anonymous_id": "device-42",
            "session_id": "s-1",
            "item_id": "sku-123",
            "dwell_ms": 5400,
            "consent": "analytics",
        },
    },
    "batch": {
        "summary": "A batch: a click attributed to a served list, and a purchase",
        "value": [
            {
                "event_id": "5d3d9c1e-8a51-4c0b-b6a4-2b5d0c9e7a11",
                "event_type": "click",
                "ts": "2025-06-10T12:00:05Z",
                "anonymous_id": "device-42",
                "user_id": "u-7",
                "item_id": "sku-456",
                "rec_request_id": "7f3c2b1a9d8e4f60a1b2c3d4e5f60718",
            },
            {
                "event_id": "9a0b1c2d-3e4f-4a5b-8c6d-7e8f9a0b1c2d",
                "event_type": "purchase",
                "ts": "2025-06-10T12:03:00Z",
                "anonymous_id": "device-42",
                "user_id": "u-7",
                "item_id": "sku-456",
                "quantity": 1,
                "price": 59.9,
            },
        ],
    },
}


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    reason: str = Field(description="A short human explanation, e.g. 'because you viewed Trail Runner 2'.")
    sources: list[str] = Field(
        description="Generators that proposed the item: als, covis, next, neighbours, trending, category, new."
    )
    category: str
    promoted: bool = False


class RecommendationsResponse(BaseModel):
    request_id: str = Field(description="Send it back as `rec_request_id` on clicks to attribute them.")
    model_version: str | None
    variant: str
    degraded: str | None = Field(None, description="Why the answer is degraded (null when it is not).")
    experiments: dict[str, str] = Field(description="experiment name -> variant this person is in.")
    items: list[RecommendedItem]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "7f3c2b1a9d8e4f60a1b2c3d4e5f60718",
                    "model_version": "20250610T020000Z",
                    "variant": "ranker",
                    "degraded": None,
                    "experiments": {"recs": "ranker"},
                    "items": [
                        {
                            "item_id": "sku-456",
                            "score": 1.73,
                            "reason": "because you viewed Trail Runner 2",
                            "sources": ["als", "covis"],
                            "category": "Shoes",
                            "promoted": False,
                        },
                        {
                            "item_id": "sku-789",
                            "score": 1.41,
                            "reason": "trending in Shoes",
                            "sources": ["trending"],
                            "category": "Shoes",
                            "promoted": True,
                        },
                    ],
                }
            ]
        }
    )


class SimilarItem(BaseModel):
    item_id: str
    score: float = Field(description="Cosine of the item vectors plus the co-visit share (co-visits over the row's most).")
    category: str
    source: Literal["covis", "content", "als"] = Field(
        description="What found the item: co-visits, a content vector (an item new since the model's cutoff) "
        "or two ALS vectors."
    )
    reason: str = Field(description="The source in words.")


class SimilarResponse(BaseModel):
    item_id: str
    model_version: str | None
    degraded: str | None = None
    items: list[SimilarItem]


class CatalogUpdateResponse(BaseModel):
    updated: int
    out_of_stock: list[str] = Field(description="Items of this batch now out of stock (never recommended).")
    promoted: list[str] = Field(description="Items of this batch now promoted (boosted).")


class ErasureResponse(BaseModel):
    user_id: str
    devices_erased: int = Field(description="Devices linked to the user (by identify) erased with them.")
    redis_keys_deleted: int
    stream_entries_deleted: int = Field(description="Entries of the event stream and its dead letters naming them.")
    lake_erasure_queued: str = Field(description="Path of the queued request the next batch run applies.")


class ConsentChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    consent: Consent = Field(description="The person's new consent state.")


class ConsentResponse(BaseModel):
    user_id: str
    consent: Consent
    devices: int = Field(description="Devices linked to the user (by identify) the change applies to as well.")
    redis_keys_deleted: int = Field(description="Their person-level keys, deleted when personalisation was withdrawn.")
    lake_erasure_queued: str | None = Field(
        None, description="Path of the queued lake erasure when analytics was withdrawn, else null."
    )


class ModelInfo(BaseModel):
    version: str
    created_at: datetime
    cutoff: datetime
    engine: str
    status: str
    decision: str | None
    ranker_unused: str | None = Field(
        None, description="Why this version's pools are ordered without its ranker (it lost to their heuristic order)."
    )
    metrics: dict[str, dict[str, float]]
    active: bool = Field(description="CURRENT in the registry.")
    serving: bool = Field(description="Loaded by the worker that answered.")


class ModelsResponse(BaseModel):
    current: str | None
    serving: str | None
    models: list[ModelInfo]


class ActivateResponse(BaseModel):
    version: str
    previous: str | None
    serving: str
    notified_workers: int = Field(
        description="Subscribers that heard the pub/sub message (other workers, speed layer)."
    )


class Readiness(BaseModel):
    ready: bool
    model_version: str | None
    model_error: str | None = None
    redis: Literal["up", "down"]
    redis_error: str | None = None


class TokenRequest(BaseModel):
    """Whom a session token is for: the browser's session, its device and, once logged in, its user."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"session_id": "s-1", "anonymous_id": "device-42", "user_id": "u-7"}]},
    )

    session_id: Id
    anonymous_id: Id
    user_id: Id | None = Field(None, description="Only once your server knows the person is logged in as this user.")
    scopes: list[TokenScope] | None = Field(
        None, min_length=1, description="Default: those of events:write and recs:read the key holds."
    )


class TokenResponse(BaseModel):
    token: str = Field(
        description="Send as `Authorization: Bearer <token>`, or as `?access_token=` where no header can go "
        "(EventSource, sendBeacon)."
    )
    token_type: Literal["Bearer"] = "Bearer"
    expires_at: datetime
    expires_in: int = Field(description="Seconds; get a new token before then.")
    scopes: list[TokenScope]
