"""The event contract: one pydantic model, with the Arrow/Parquet schema derived from it.

Every layer (API ingestion, stream consumers, lake, Spark, warehouse) goes through this
module, so a field is added or limited in exactly one place.
"""

from __future__ import annotations

import re
import time
import types
import typing
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import pyarrow as pa
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import SchemaValidator

from common.ids import ID_PATTERN, Id, printable_id

SCHEMA_VERSION = 1
MAX_CLOCK_SKEW = timedelta(hours=1)
EARLIEST_TS = datetime(2000, 1, 1, tzinfo=UTC)
EVENT_ID_NAMESPACE = uuid.UUID("6f0c1d2e-8a4b-4e0f-9c3d-2b7a5e1f4c60")
EARLIEST_TS_S = EARLIEST_TS.timestamp()
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

ShortText = Annotated[str, StringConstraints(max_length=256)]


def _a_json_number(value: Any) -> Any:
    # As JSON Schema reads a number: "2" and true are not one; 2.0 is the whole number 2.
    if isinstance(value, str | bool):
        raise ValueError("must be a JSON number")
    return value


JsonNumber = BeforeValidator(_a_json_number)


class EventType(StrEnum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    REMOVE_FROM_CART = "remove_from_cart"
    PURCHASE = "purchase"
    WISHLIST = "wishlist"
    SEARCH = "search"
    IDENTIFY = "identify"
    HOVER = "hover"


# Item events that express interest: what the replay scores as a next item and ranker training labels.
INTEREST_EVENTS = frozenset({"view", "click", "add_to_cart", "purchase", "wishlist"})
# Item events that count for a category's bestsellers (speed layer and ranker training).
BESTSELLER_EVENTS = frozenset({"add_to_cart", "purchase"})

# Item events that record attention only (a product card hovered, with dwell_ms): kept in the lake and
# counted in the session's counts by type, never an interaction: no training weight, no session items,
# co-visits, neighbours, popularity or affinity, and no live update of the person's list.
ATTENTION_EVENTS = frozenset({"hover"})


class Consent(StrEnum):
    """What the person agreed to in the store's consent banner. A ladder: each state allows what the
    one before it does, and more (README, 'Consent')."""

    NONE = "none"  # counted in the live aggregates (trending, popularity, bestsellers) only
    ANALYTICS = "analytics"  # also kept in the lake with its ids (warehouse, batch aggregates)
    PERSONALISATION = "personalisation"  # also person-level state: live (sessions, deltas) and batch (factors)

    def allows(self, needed: Consent) -> bool:
        return _CONSENT_RANK[self] >= _CONSENT_RANK[needed]

    def capped(self, cap: Consent) -> Consent:
        """The lower of the two: what an event allows once the person withdrew down to `cap`."""
        return self if cap.allows(self) else cap


_CONSENT_RANK = {state: rank for rank, state in enumerate(Consent)}
# A client that sends no consent keeps the behaviour from before consent existed: everything is kept.
# A store that must ask (GDPR, CCPA) sends the banner's answer with every event (tracker.js `consent`).
DEFAULT_CONSENT = Consent.PERSONALISATION

# The fields that name a person (a device, a user): what erasure looks for in an event's payload.
PERSON_ID_FIELDS = ("anonymous_id", "user_id")

ITEM_EVENTS = frozenset(
    {
        EventType.VIEW,
        EventType.CLICK,
        EventType.ADD_TO_CART,
        EventType.REMOVE_FROM_CART,
        EventType.PURCHASE,
        EventType.WISHLIST,
        EventType.HOVER,
    }
)


class EventContext(BaseModel):
    """Where the event happened. Bounded: four known fields and at most 16 short extras."""

    model_config = ConfigDict(extra="forbid")

    device: Annotated[str, StringConstraints(max_length=32)] | None = None
    country: Annotated[str, StringConstraints(max_length=8)] | None = None
    referrer: ShortText | None = None
    page: ShortText | None = None
    extra: dict[Annotated[str, StringConstraints(max_length=32)], ShortText] = Field(
        default_factory=dict, max_length=16
    )


def _rules_by_type(schema: dict[str, Any]) -> None:
    """State `Event._required_by_type` in the JSON schema (OpenAPI), from the same sets, for clients."""
    schema["allOf"] = [
        _requires(sorted(k.value for k in ITEM_EVENTS), "item_id", {"type": "string"}),
        _requires([EventType.IDENTIFY.value], "user_id", {"type": "string"}),
        _requires([EventType.SEARCH.value], "query", {"type": "string", "minLength": 1}),
    ]


def _requires(kinds: list[str], field: str, shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "if": {"required": ["event_type"], "properties": {"event_type": {"enum": kinds}}},
        "then": {"required": [field], "properties": {field: shape}},
    }


class Event(BaseModel):
    """One user interaction, as accepted from a storefront, an importer or the generator.

    Every event names the device (`anonymous_id`); once the person has logged in it names them too
    (`user_id`), and an `identify` event links the two. Item events need `item_id`, `search` needs `query`.
    """

    model_config = ConfigDict(extra="forbid", use_enum_values=False, json_schema_extra=_rules_by_type)

    event_id: Annotated[
        str, Field(description="Client-made UUID; the idempotency key.", json_schema_extra={"format": "uuid"})
    ]
    event_type: EventType
    ts: datetime = Field(
        description=f"Event time on the client, UTC; from {EARLIEST_TS:%Y-%m-%d} to at most "
        f"{MAX_CLOCK_SKEW.total_seconds() / 3600:g} hour ahead of the server clock."
    )
    received_at: datetime | None = Field(
        None, description="Server arrival time; set on ingestion (a client's value is replaced)."
    )
    anonymous_id: Id = Field(description="The device (browser, app install): every event names it.")
    user_id: Id | None = Field(None, description="The logged-in person, once known; required by identify.")
    session_id: Id | None = None
    item_id: Id | None = None
    quantity: Annotated[int | None, JsonNumber] = Field(None, ge=1, le=10_000)
    price: Annotated[float | None, JsonNumber] = Field(None, ge=0, le=1_000_000)
    dwell_ms: Annotated[int | None, JsonNumber] = Field(None, ge=0, le=86_400_000)
    scroll_depth: Annotated[float | None, JsonNumber] = Field(None, ge=0, le=1)
    query: ShortText | None = None
    context: EventContext = Field(default_factory=EventContext)
    rec_request_id: Id | None = None
    consent: Consent = Field(
        DEFAULT_CONSENT,
        description="What the person consented to: `none` (counted in live aggregates only), `analytics` "
        "(also stored in the lake with its ids), `personalisation` (also person-level live state). "
        "Default `personalisation`: a client that sends none is treated as before consent existed.",
    )
    schema_version: Annotated[int, JsonNumber] = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)

    @field_validator("event_id")
    @classmethod
    def _event_id_is_uuid(cls, value: str) -> str:
        if _CANONICAL_UUID.fullmatch(value):  # the usual form, already canonical: skip the parse
            return value
        try:
            return str(uuid.UUID(value))
        except (ValueError, AttributeError, TypeError):
            raise ValueError("must be a UUID") from None

    @field_validator("ts", "received_at")
    @classmethod
    def _utc_and_sane(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        try:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00: its UTC time falls outside years 1-9999
            raise ValueError("is outside the years 1-9999 once converted to UTC") from None
        epoch_s = value.timestamp()
        if epoch_s < EARLIEST_TS_S:
            raise ValueError(f"is before {EARLIEST_TS:%Y-%m-%d}")
        if epoch_s > time.time() + MAX_CLOCK_SKEW.total_seconds():
            raise ValueError("is in the future (more than 1 hour ahead of the server clock)")
        return value

    @model_validator(mode="after")
    def _required_by_type(self) -> Event:
        kind = self.event_type
        # Identity tests: hashing an enum member runs Python code, and this runs for every event.
        if self.item_id is None and any(kind is k for k in ITEM_EVENTS):
            raise ValueError(f"item_id is required for {kind.value} events")
        if kind is EventType.IDENTIFY and self.user_id is None:
            raise ValueError("user_id is required for identify events")
        if kind is EventType.SEARCH and not self.query:
            raise ValueError("query is required for search events")
        return self

    @property
    def person_id(self) -> str:
        """The identity recommendations are keyed by: the user once known, else the device."""
        return self.user_id or self.anonymous_id

    @property
    def person_ids(self) -> list[str]:
        """Every id of a person the event names (PERSON_ID_FIELDS): an erasure of any of them covers it."""
        return [self.anonymous_id] if self.user_id is None else [self.anonymous_id, self.user_id]

    @property
    def personalised(self) -> bool:
        """Whether the event may build person-level state (identity test: this runs for every event)."""
        return self.consent is Consent.PERSONALISATION

    def received(self, at: datetime | None = None) -> Event:
        """A copy stamped with the server's arrival time."""
        return self.model_copy(update={"received_at": at or datetime.now(UTC)})


# ---------------------------------------------------------------- events read back where they were stored


def _stored_event_schema(node: Any) -> Any:
    """Event's core schema with each field check written in Python replaced by its native part
    (`_NATIVE_PART`); the rule by event type (a model validator) stays as it is."""
    if isinstance(node, list):
        return [_stored_event_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    if node.get("type") in ("function-after", "function-before") and node["schema"].get("type") != "model":
        function = node["function"]["function"]
        if function not in _NATIVE_PART:
            raise TypeError(f"{function!r}: say in _NATIVE_PART how a stored event is checked for it")
        return _constrained(_stored_event_schema(node["schema"]), _NATIVE_PART[function])
    return {key: _stored_event_schema(value) for key, value in node.items()}


def _constrained(schema: dict[str, Any], constraints: dict[str, Any]) -> dict[str, Any]:
    if schema["type"] == "nullable":
        return {**schema, "schema": _constrained(schema["schema"], constraints)}
    return {**schema, **constraints}


# A stored event's fields come as `model_dump_json` of a validated Event wrote them, where each Python
# check has nothing left to do: its native part passes such a value unchanged and sends any other
# spelling the full way (`parse_stored_event`). Except the hour ahead: that bound is the arrival's.
_NATIVE_PART: dict[Any, dict[str, Any]] = {
    printable_id: {"pattern": ID_PATTERN},
    Event._event_id_is_uuid: {"pattern": f"^{_CANONICAL_UUID.pattern}$"},
    _a_json_number: {"strict": True},  # a JSON number of the field's type: 2.0 for an int goes the full way
    Event._utc_and_sane: {"tz_constraint": "aware", "ge": EARLIEST_TS},
}
_STORED_EVENT = SchemaValidator(_stored_event_schema(Event.__pydantic_core_schema__))


def parse_stored_event(raw: bytes | str) -> Event:
    """An event read back from where the API or an importer stored it (a stream entry, written by
    common/stream.append_events): what `Event.model_validate_json(raw)` gives, but for the one check
    below, at about 0.6 of its cost (4.8 against 7.8 us: the speed consumer decodes every event).

    Its structure is checked again, natively: types, enums, lengths, ranges, the ids' characters, the
    UUID's form and the rule by event type. What that refuses (a spelling the API would not have
    written, or malformed data) goes through the full model, which decides and names the error. One
    check is left out on purpose: `ts` at most an hour ahead of the clock. It was checked on arrival;
    checked again against a consumer's clock, one behind the API's would drop accepted events."""
    try:
        event: Event = _STORED_EVENT.validate_json(raw)
    except ValidationError:
        return Event.model_validate_json(raw)
    # The times as the full model gives them: in datetime.UTC, not pydantic's TzInfo(0) (whose datetimes
    # subtract and convert 2.6-2.8x slower). Set in place: they are the validated values, converted.
    fields = event.__dict__
    fields["ts"] = fields["ts"].astimezone(UTC)
    if fields["received_at"] is not None:
        fields["received_at"] = fields["received_at"].astimezone(UTC)
    return event


def new_event_id() -> str:
    return str(uuid.uuid4())


def deterministic_event_id(*parts: object) -> str:
    """A stable UUID for importers and the generator, so a re-import dedups instead of duplicating."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, "|".join(str(p) for p in parts)))


# ---------------------------------------------------------------- Arrow schema, derived


def _arrow_type(annotation: Any) -> pa.DataType:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _arrow_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _arrow_type(inner)
    if origin is dict:
        key, value = typing.get_args(annotation)
        return pa.map_(_arrow_type(key), _arrow_type(value))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([_arrow_field(n, f) for n, f in annotation.model_fields.items()])
    simple = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    if annotation in simple:
        return simple[annotation]
    if annotation is datetime:
        return pa.timestamp("us", tz="UTC")
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        return pa.string()
    raise TypeError(f"no Arrow type for {annotation!r}")


def _arrow_field(name: str, field: Any) -> pa.Field:
    required = field.is_required()
    return pa.field(name, _arrow_type(field.annotation), nullable=not required)


def _event_schema() -> pa.Schema:
    fields = [_arrow_field(name, f) for name, f in Event.model_fields.items()]
    # In the lake every event has been received, so received_at is never null there.
    fields = [f.with_nullable(False) if f.name == "received_at" else f for f in fields]
    return pa.schema(fields, metadata={"schema_version": str(SCHEMA_VERSION)})


EVENT_SCHEMA: pa.Schema = _event_schema()
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_SCHEMA.names)
# Columns added after lake files were first written: a file without one reads it as null, which
# `table_to_events` takes as the field's default, so such a file is not drift (spark_jobs/quality.py).
ADDED_COLUMNS = frozenset({"consent"})


def _to_row(event: Event) -> dict[str, Any]:
    row = event.model_dump()
    row["event_type"] = event.event_type.value
    row["consent"] = event.consent.value
    row["context"]["extra"] = list(row["context"]["extra"].items())
    return row


def events_to_table(events: Iterable[Event]) -> pa.Table:
    """Received events as an Arrow table in the lake schema."""
    rows = []
    for event in events:
        if event.received_at is None:
            raise ValueError(f"event {event.event_id} has no received_at; stamp it with .received() first")
        rows.append(_to_row(event))
    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def table_to_events(table: pa.Table) -> list[Event]:
    rows = table.select(list(EVENT_COLUMNS)).to_pylist()
    for row in rows:
        row["context"]["extra"] = dict(row["context"]["extra"] or [])
        if row["consent"] is None:  # a file from before the column: the default, as for a client's
            del row["consent"]
    return [Event.model_validate(row) for row in rows]


# ---------------------------------------------------------------- validation with named reasons


class FieldError(BaseModel):
    field: str
    reason: str


class EventError(BaseModel):
    index: int
    event_id: str | None
    errors: list[FieldError]


def describe_validation_error(exc: ValidationError) -> list[FieldError]:
    out = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "event"
        reason = err["msg"].removeprefix("Value error, ")
        out.append(FieldError(field=field, reason=reason))
    return out


def validate_events(payloads: Sequence[Any]) -> tuple[list[Event], list[EventError]]:
    """Validate a batch; good events are kept, each bad one is reported by index with its fields."""
    accepted: list[Event] = []
    rejected: list[EventError] = []
    for index, payload in enumerate(payloads):
        try:
            accepted.append(Event.model_validate(payload))
        except ValidationError as exc:
            event_id = payload.get("event_id") if isinstance(payload, dict) else None
            rejected.append(
                EventError(index=index, event_id=str(event_id) if event_id else None, errors=describe_validation_error(exc))
            )
    return accepted, rejected
