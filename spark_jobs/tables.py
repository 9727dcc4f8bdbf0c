"""Batch-side tables shared with serving: item popularity and ordered co-visitation.

Computed with DuckDB over Arrow event tables, both for the published artifacts (everything
before the cutoff) and point-in-time for ranker training (everything before a window starts).
"""

from __future__ import annotations

import pyarrow as pa

from common import duck
from common.events import ATTENTION_EVENTS
from common.sequence import SEQUENCE_EXCLUDED_TYPES, SequenceCounter

POPULARITY_SCHEMA = pa.schema([pa.field("item_id", pa.string()), pa.field("count", pa.int64())])
COVISITATION_SCHEMA = pa.schema(
    [pa.field("item_id", pa.string()), pa.field("other_id", pa.string()), pa.field("count", pa.float64())]
)
SEQUENCE_COLUMNS = ["event_id", "event_type", "session_id", "anonymous_id", "item_id", "ts", "received_at"]


def popularity(events: pa.Table) -> pa.Table:
    """item_id, count: item events per item (every type but attention), most popular first."""
    with duck.connect() as con:
        con.register("events", events.select(["item_id", "event_type"]))
        attention = ", ".join(f"'{t}'" for t in sorted(ATTENTION_EVENTS))
        sql = f"""SELECT item_id, count(*) AS count FROM events
                 WHERE item_id IS NOT NULL AND event_type NOT IN ({attention})
                 GROUP BY item_id ORDER BY count DESC, item_id"""
        return con.sql(sql).to_arrow_table().cast(POPULARITY_SCHEMA)


def covisitation(events: pa.Table, top_n: int, steps: int, recent_n: int) -> pa.Table:
    """item_id, other_id, count: ordered co-visits (`common.sequence`: `other` followed `item` within
    `steps` items, weighted by the gap), the top_n others per item, in arrival order as the speed layer."""
    counter = SequenceCounter(steps=steps, recent_n=recent_n, top_n=top_n)
    counter.add_all(sequence_events(events))
    rows = [(item, other, weight) for item, others in sorted(counter.top().items()) for other, weight in others.items()]
    return pa.table(
        {
            "item_id": [r[0] for r in rows],
            "other_id": [r[1] for r in rows],
            "count": [r[2] for r in rows],
        },
        schema=COVISITATION_SCHEMA,
    )


def sequence_events(events: pa.Table) -> list[tuple[str, str, float]]:
    """(session, item, ts_s) of the item events that enter a session's recent items, in arrival order."""
    with duck.connect() as con:
        con.register("events", events.select(SEQUENCE_COLUMNS))
        excluded = ", ".join(f"'{t}'" for t in sorted(SEQUENCE_EXCLUDED_TYPES))
        sql = f"""
            SELECT coalesce(session_id, anonymous_id) AS sid, item_id, epoch_us(ts) / 1e6 AS ts_s
            FROM events WHERE item_id IS NOT NULL AND event_type NOT IN ({excluded})
            ORDER BY received_at, ts, event_id"""
        table = con.sql(sql).to_arrow_table()
    return list(zip(table["sid"].to_pylist(), table["item_id"].to_pylist(), table["ts_s"].to_pylist(), strict=True))


def nested(table: pa.Table, key: str, other: str, value: str) -> dict[str, dict[str, float]]:
    """A long table as key -> {other: value}, the shape the candidate generators take."""
    out: dict[str, dict[str, float]] = {}
    for k, o, v in zip(table[key].to_pylist(), table[other].to_pylist(), table[value].to_pylist(), strict=True):
        out.setdefault(k, {})[o] = float(v)
    return out
