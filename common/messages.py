"""Typed messages that cross layers over Redis pub/sub (never untyped lists)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelEvent(BaseModel):
    """A model version became the serving one (published by the DAG, activated or rolled back by hand)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["published", "activated", "rolled_back"]
    version: str
    cutoff: datetime
    previous: str | None = None


class RecsChanged(BaseModel):
    """The speed layer changed state that a person's recommendations read: the last event of the person
    that its batch applied (drives SSE)."""

    model_config = ConfigDict(extra="forbid")

    person_id: str
    session_id: str | None = None
    event_type: str
    item_id: str | None = None


class RecsChangedBatch(BaseModel):
    """What RECS_CHANNEL carries: every person one speed-layer batch changed, in one message.

    A message a person cost the consumer, Redis and every subscribing worker a message's overhead per
    event when visitors browse at once, since a batch then holds as many people as events."""

    model_config = ConfigDict(extra="forbid")

    changes: list[RecsChanged]
