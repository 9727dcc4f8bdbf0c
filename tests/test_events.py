"""The event contract: each kind of bad event is refused with its field and reason; Arrow round trips."""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pytest
from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import SchemaValidator, core_schema

from common.events import (
    _STORED_EVENT,
    EVENT_SCHEMA,
    Event,
    EventType,
    _stored_event_schema,
    describe_validation_error,
    deterministic_event_id,
    events_to_table,
    new_event_id,
    parse_stored_event,
    table_to_events,
    validate_events,
)
from common.ids import ID_PATTERN, NOT_PRINTABLE, printable_id
from common.lake import Lake

TS = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def payload(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "9b2f1d5e-3c4a-4e7b-8f10-2a3b4c5d6e7f",
        "event_type": "view",
        "ts": TS.isoformat(),
        "anonymous_id": "anon-1",
        "item_id": "p1",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def errors_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        Event.model_validate(data)
    return {e.field: e.reason for e in describe_validation_error(info.value)}


BAD_EVENTS = [
    ({"event_id": "not-a-uuid"}, "event_id", "must be a UUID"),
    ({"event_type": "like"}, "event_type", "Input should be 'view'"),
    ({"ts": (datetime.now(UTC) + timedelta(hours=3)).isoformat()}, "ts", "is in the future"),
    ({"ts": "1999-12-31T00:00:00Z"}, "ts", "is before 2000-01-01"),
    ({"ts": "yesterday"}, "ts", "Input should be a valid datetime"),
    ({"anonymous_id": ""}, "anonymous_id", "at least 1 character"),
    ({"anonymous_id": "x" * 129}, "anonymous_id", "at most 128 characters"),
    ({"price": -1}, "price", "greater than or equal to 0"),
    ({"quantity": 0}, "quantity", "greater than or equal to 1"),
    ({"quantity": 10_001}, "quantity", "less than or equal to 10000"),
    ({"scroll_depth": 1.5}, "scroll_depth", "less than or equal to 1"),
    ({"dwell_ms": -5}, "dwell_ms", "greater than or equal to 0"),
    ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"context": {"device": "mobile", "weather": "sunny"}}, "context.weather", "Extra inputs are not permitted"),
    ({"context": {"extra": {f"k{i}": "v" for i in range(17)}}}, "context.extra", "at most 16 items"),
    ({"context": {"country": "United Kingdom"}}, "context.country", "at most 8 characters"),
    ({"query": "q" * 257}, "query", "at most 256 characters"),
    ({"schema_version": 99}, "schema_version", "less than or equal to 1"),
    ({"quantity": "2"}, "quantity", "must be a JSON number"),
    ({"scroll_depth": True}, "scroll_depth", "must be a JSON number"),
    ({"quantity": 1.5}, "quantity", "fractional part"),
    ({"anonymous_id": " anon-1"}, "anonymous_id", "without control characters or surrounding spaces"),
    ({"item_id": "p\u202e1"}, "item_id", "printable"),  # a bidi override
    ({"item_id": None}, "event", "item_id is required for view events"),
    ({"event_type": "identify", "item_id": None}, "event", "user_id is required for identify events"),
    ({"event_type": "search", "item_id": None}, "event", "query is required for search events"),
]


@pytest.mark.parametrize(("changes", "field", "reason"), BAD_EVENTS)
def test_each_kind_of_bad_event_is_named(changes: dict[str, Any], field: str, reason: str) -> None:
    errors = errors_of(payload(**changes))
    assert field in errors, errors
    assert reason in errors[field]


def test_a_whole_number_may_come_as_a_float_as_json_schema_reads_it() -> None:
    assert Event.model_validate(payload(event_type="purchase", quantity=2.0, price=3)).quantity == 2


def stored(event: Event) -> bytes:
    """An accepted event as common/stream.append_events stores it."""
    return event.model_dump_json(exclude_none=True).encode()


def accepted_events(n: int, seed: int) -> list[Event]:
    """Events as the API accepts them, of every type and optional field, sent in spellings the full
    model rewrites (an offset or naive time, an upper-case UUID, a whole number as a float)."""
    rng = random.Random(seed)
    events = []
    for i in range(n):
        kind = rng.choice(list(EventType))
        when = datetime.now(UTC) - timedelta(seconds=rng.uniform(0, 400 * 86400))
        changes: dict[str, Any] = {
            "event_id": rng.choice([new_event_id(), new_event_id().upper(), deterministic_event_id("s", i)]),
            "event_type": kind.value,
            "ts": rng.choice([when.isoformat(), when.astimezone(timezone(timedelta(hours=-5))).isoformat(),
                              when.replace(tzinfo=None).isoformat()]),
            "anonymous_id": f"dev-{rng.randrange(50)}",
            "user_id": rng.choice([None, f"u\u00e9-{i}"]),
            "session_id": rng.choice([None, f"s-{i}"]),
            "item_id": None if kind.value in {"search", "identify"} else f"item {rng.randrange(100)}",
            "quantity": rng.choice([None, 2, 3.0]),
            "price": rng.choice([None, 0, 4.25, 7.0]),
            "dwell_ms": rng.choice([None, 1200]),
            "scroll_depth": rng.choice([None, 0.5, 1]),
            "query": "lamp" if kind.value == "search" else rng.choice([None, "q"]),
            "context": rng.choice([{}, {"device": "mobile", "extra": {"ab": "b", "c": "\u00e9"}}]),
            "rec_request_id": rng.choice([None, f"r-{i}"]),
            "consent": rng.choice([None, "none", "analytics", "personalisation"]),
        }
        if kind.value == "identify":
            changes["user_id"] = f"u-{i}"
        event = Event.model_validate({k: v for k, v in changes.items() if v is not None})
        events.append(event.received() if rng.random() < 0.8 else event)
    return events


def test_a_stored_event_reads_back_as_the_full_model_reads_it_on_the_native_path() -> None:
    for event in accepted_events(400, seed=11):
        raw = stored(event)
        read = parse_stored_event(raw)
        assert read == Event.model_validate_json(raw) == event
        assert read.__dict__ == event.__dict__ and read.model_fields_set == Event.model_validate_json(raw).model_fields_set
        assert read.ts.tzinfo is UTC and (read.received_at is None or read.received_at.tzinfo is UTC)
        assert _STORED_EVENT.validate_json(raw) is not None  # the native path reads it whole (no fallback)


@pytest.mark.parametrize(
    ("changes", "native"),
    [({"ts": "2026-05-01T12:00:00"}, False), ({"event_id": "9B2F1D5E-3C4A-4E7B-8F10-2A3B4C5D6E7F"}, False),
     ({"event_id": "9b2f1d5e3c4a4e7b8f102a3b4c5d6e7f"}, False), ({"event_type": "purchase", "quantity": 2.0, "price": 3}, False),
     ({"ts": "2026-05-01T14:00:00+02:00"}, True)],
)  # fmt: skip
def test_a_spelling_the_api_does_not_write_is_read_as_the_full_model_reads_it(changes: dict[str, Any], native: bool) -> None:
    """A naive time, another UUID spelling, a whole float: refused natively, read by the full model. An
    offset: read natively and converted to UTC, as the full model converts it."""
    raw = json.dumps(payload(**changes)).encode()
    try:
        _STORED_EVENT.validate_json(raw)
        natively = True
    except ValidationError:
        natively = False
    assert natively == native
    read = parse_stored_event(raw)
    assert read.__dict__ == Event.model_validate_json(raw).__dict__
    assert read.ts.tzinfo is UTC


@pytest.mark.parametrize(("changes", "field", "reason"), [bad for bad in BAD_EVENTS if bad[2] != "is in the future"])
def test_a_bad_stored_event_fails_with_the_full_models_errors(changes: dict[str, Any], field: str, reason: str) -> None:
    raw = json.dumps(payload(**changes)).encode()
    with pytest.raises(ValidationError) as stored_error:
        parse_stored_event(raw)
    with pytest.raises(ValidationError) as full_error:
        Event.model_validate_json(raw)
    assert describe_validation_error(stored_error.value) == describe_validation_error(full_error.value)
    assert reason in {e.field: e.reason for e in describe_validation_error(stored_error.value)}[field]


def test_a_stored_event_ahead_of_this_clock_is_read_as_it_was_accepted() -> None:
    """The hour-ahead bound is the arrival's: a consumer whose clock is behind the API's must not drop an
    event the API accepted."""
    ahead = datetime.now(UTC) + timedelta(hours=3)
    raw = json.dumps(payload(ts=ahead.isoformat())).encode()
    with pytest.raises(ValidationError):
        Event.model_validate_json(raw)
    assert parse_stored_event(raw).ts == ahead


def test_the_native_id_pattern_accepts_exactly_what_printable_id_does() -> None:
    """Stored events check ids with ID_PATTERN natively (pydantic-core's Rust regex): every code point
    alone, inside, first and last is accepted or refused as printable_id (Python's) says."""
    native = SchemaValidator(core_schema.str_schema(pattern=ID_PATTERN))
    for c in map(chr, range(sys.maxunicode + 1)):
        if "\ud800" <= c <= "\udfff":
            continue  # not in UTF-8 or JSON text
        for value in (c, "a" + c, c + "a", "a" + c + "b"):
            try:
                native.validate_python(value)
                natively = True
            except ValidationError:
                natively = False
            try:
                in_python = printable_id(value) == value
            except ValueError:
                in_python = False
            assert natively == in_python, repr(value)


def test_a_python_check_without_a_native_part_stops_the_stored_path() -> None:
    class Checked(BaseModel):
        name: str

        @field_validator("name")
        @classmethod
        def _shout(cls, value: str) -> str:
            return value.upper()

    with pytest.raises(TypeError, match="_NATIVE_PART"):
        _stored_event_schema(Checked.__pydantic_core_schema__)


def test_the_id_pattern_refuses_exactly_the_control_format_and_separator_characters() -> None:
    """NOT_PRINTABLE is written out (computing it costs every process a scan of Unicode): hold it to unicodedata."""
    refused = {
        c for c in range(sys.maxunicode + 1)
        if unicodedata.category(chr(c)) in {"Cc", "Cf", "Zl", "Zp", "Zs"} and chr(c) != " "
    }  # fmt: skip
    class_re = re.compile(f"[{NOT_PRINTABLE}]")
    listed = {c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF and class_re.match(chr(c))}
    assert listed == refused
    assert unicodedata.unidata_version == "14.0.0", "a new Unicode: regenerate NOT_PRINTABLE from it"


def test_the_ascii_fast_path_accepts_exactly_what_the_id_pattern_does() -> None:
    """printable_id skips the regex for ASCII ids: every ASCII character first, inside and last, and random
    ASCII and non-ASCII ids, are accepted or refused as ID_PATTERN (the OpenAPI's) says."""
    pattern = re.compile(ID_PATTERN)
    rng = random.Random(5)
    ids = [s for c in map(chr, range(128)) for s in (c, c + "a", "a" + c, "a" + c + "b")]
    alphabet = [chr(c) for c in range(128)] + ["\u00e9", "\u202e", "\u00a0", "\u3000"]
    ids += ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(20_000)]
    for value in ids:
        try:
            accepted = printable_id(value) == value
        except ValueError:
            accepted = False
        assert accepted == bool(pattern.fullmatch(value)), repr(value)


def test_missing_required_fields_are_each_named() -> None:
    errors = errors_of({"event_type": "view"})
    assert {"event_id", "ts", "anonymous_id"} <= set(errors)
    assert all(r == "Field required" for f, r in errors.items() if f in {"event_id", "ts", "anonymous_id"})


def test_naive_and_offset_times_become_utc() -> None:
    assert Event.model_validate(payload(ts="2026-05-01T12:00:00")).ts == TS
    assert Event.model_validate(payload(ts="2026-05-01T14:00:00+02:00")).ts == TS


def test_a_batch_keeps_the_good_events_and_reports_the_bad_by_index() -> None:
    good = [payload(event_id=new_event_id()), payload(event_id=new_event_id(), event_type="search", item_id=None, query="lamp")]
    bad = payload(event_id="e-3", price=-2)
    accepted, rejected = validate_events([good[0], bad, "not an object", good[1]])
    assert [e.event_id for e in accepted] == [good[0]["event_id"], good[1]["event_id"]]
    assert [r.index for r in rejected] == [1, 2]
    assert rejected[0].event_id == "e-3"
    assert {e.field for e in rejected[0].errors} == {"event_id", "price"}
    assert rejected[1].event_id is None


def _full_event() -> Event:
    return Event(
        event_id=deterministic_event_id("test", 1),
        event_type=EventType.PURCHASE,
        ts=TS,
        received_at=TS + timedelta(seconds=2),
        anonymous_id="anon-1",
        user_id="u1",
        session_id="s1",
        item_id="p1",
        quantity=2,
        price=19.99,
        dwell_ms=1500,
        scroll_depth=0.5,
        query=None,
        context={"device": "mobile", "country": "GB", "referrer": "email", "page": "checkout", "extra": {"ab": "b"}},
        rec_request_id="r1",
    )


def test_arrow_round_trip_equals_the_model() -> None:
    events = [_full_event(), Event.model_validate(payload()).received(TS)]
    table = events_to_table(events)
    assert table.schema.equals(EVENT_SCHEMA)
    assert table_to_events(table) == events


def test_parquet_round_trip_through_the_lake_equals_the_model(tmp_path) -> None:
    event = _full_event()
    lake = Lake(str(tmp_path))
    lake.write_events(events_to_table([event]))
    assert table_to_events(lake.read_events()) == [event]


def test_schema_is_derived_from_the_model() -> None:
    assert list(EVENT_SCHEMA.names) == list(Event.model_fields)
    assert EVENT_SCHEMA.field("ts").type == pa.timestamp("us", tz="UTC")
    assert not EVENT_SCHEMA.field("received_at").nullable  # every event in the lake was received
    assert not EVENT_SCHEMA.field("event_id").nullable
    assert EVENT_SCHEMA.field("context").type.get_field_index("extra") >= 0


def test_a_table_needs_received_at() -> None:
    with pytest.raises(ValueError, match="has no received_at"):
        events_to_table([Event.model_validate(payload())])


def test_deterministic_ids_are_stable_uuids() -> None:
    assert deterministic_event_id("a", 1) == deterministic_event_id("a", 1) != deterministic_event_id("a", 2)
    assert Event.model_validate(payload(event_id=deterministic_event_id("a", 1))).event_id == deterministic_event_id("a", 1)
