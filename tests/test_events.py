"""The event contract: each kind of bad event is refused with its field and reason; Arrow round trips."""

from __future__ import annotations

import random
import re
import sys
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from pydantic import ValidationError

from common.events import (
    EVENT_SCHEMA,
    Event,
    EventType,
    describe_validation_error,
    deterministic_event_id,
    events_to_table,
    new_event_id,
    table_to_events,
    validate_events,
)
from common.ids import ID_PATTERN, NOT_PRINTABLE, _printable
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


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
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
    ],
)
def test_each_kind_of_bad_event_is_named(changes: dict[str, Any], field: str, reason: str) -> None:
    errors = errors_of(payload(**changes))
    assert field in errors, errors
    assert reason in errors[field]


def test_a_whole_number_may_come_as_a_float_as_json_schema_reads_it() -> None:
    assert Event.model_validate(payload(event_type="purchase", quantity=2.0, price=3)).quantity == 2


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
    """_printable skips the regex for ASCII ids: every ASCII character first, inside and last, and random
    ASCII and non-ASCII ids, are accepted or refused as ID_PATTERN (the OpenAPI's) says."""
    pattern = re.compile(ID_PATTERN)
    rng = random.Random(5)
    ids = [s for c in map(chr, range(128)) for s in (c, c + "a", "a" + c, "a" + c + "b")]
    alphabet = [chr(c) for c in range(128)] + ["\u00e9", "\u202e", "\u00a0", "\u3000"]
    ids += ["".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(20_000)]
    for value in ids:
        try:
            accepted = _printable(value) == value
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
