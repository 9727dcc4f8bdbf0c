"""Typed messages that cross layers over Redis pub/sub (never untyped lists)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic_core import to_json


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


# The speed layer's effects script (speed_layer/apply_events.lua) announces the events it applies itself,
# as it applies them: it joins the applied changes' JSON (`change_json`), comma-separated, between these
# two texts, which are RecsChangedBatch's own around an empty list, so its message is the one this model writes.
_EMPTY = RecsChangedBatch(changes=[]).model_dump_json()
CHANGES_HEAD, CHANGES_TAIL = _EMPTY[: _EMPTY.index("[]") + 1], _EMPTY[_EMPTY.index("[]") + 1 :]


def change_json(person_id: str, session_id: str | None, event_type: str, item_id: str | None) -> bytes:
    """One change as RecsChangedBatch lists it, by the serializer RecsChanged's own dump uses (pydantic-core)
    but without building the model (0.35 against 1.9 µs; the consumer makes one a person a script call).
    Its fields are RecsChanged's, in order (tests/test_speed_effects.py holds the two alike)."""
    return to_json({"person_id": person_id, "session_id": session_id, "event_type": event_type, "item_id": item_id})
