"""Batch-side tables shared with serving: item popularity, co-visitation and category bestsellers.

Computed with DuckDB over Arrow event tables, both for the published artifacts (everything
before the cutoff) and point-in-time for ranker training (everything before a window starts).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from common.settings import TrainingSettings

POPULARITY_SCHEMA = pa.schema([pa.field("item_id", pa.string()), pa.field("count", pa.int64())])
COVISITATION_SCHEMA = pa.schema(
    [pa.field("item_id", pa.string()), pa.field("other_id", pa.string()), pa.field("count", pa.int64())]
)
BESTSELLER_EVENTS = ("purchase", "add_to_cart")


def popularity(events: pa.Table) -> pa.Table:
    """item_id, count: item events per item (every type), most popular first."""
    with duckdb.connect() as con:
        con.register("events", events.select(["item_id"]))
        sql = """SELECT item_id, count(*) AS count FROM events WHERE item_id IS NOT NULL
                 GROUP BY item_id ORDER BY count DESC, item_id"""
        return con.sql(sql).to_arrow_table().cast(POPULARITY_SCHEMA)


def covisitation(events: pa.Table, top_n: int) -> pa.Table:
    """item_id, other_id, count: sessions holding both items, the top_n others per item."""
    with duckdb.connect() as con:
        con.register("events", events.select(["session_id", "anonymous_id", "item_id"]))
        sql = f"""
            WITH s AS (
                SELECT DISTINCT coalesce(session_id, anonymous_id) AS sid, item_id
                FROM events WHERE item_id IS NOT NULL
            ),
            pairs AS (
                SELECT a.item_id, b.item_id AS other_id, count(*) AS count
                FROM s a JOIN s b ON a.sid = b.sid AND a.item_id <> b.item_id
                GROUP BY a.item_id, b.item_id
            )
            SELECT item_id, other_id, count FROM pairs
            QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY count DESC, other_id) <= {int(top_n)}
            ORDER BY item_id, count DESC, other_id"""
        return con.sql(sql).to_arrow_table().cast(COVISITATION_SCHEMA)


def bestsellers(events: pa.Table, catalog: pa.Table, training: TrainingSettings, top_n: int = 20) -> pa.Table:
    """category, item_id, score: carts and purchases weighted by type, the top_n items per category."""
    weights = ", ".join(f"('{t}', {float(training.weights.get(t, 0.0))!r})" for t in BESTSELLER_EVENTS)
    with duckdb.connect() as con:
        con.register("events", events.select(["event_type", "item_id"]))
        con.register("catalog", catalog.select(["item_id", "category"]))
        sql = f"""
            WITH w(event_type, weight) AS (VALUES {weights}),
            scored AS (
                SELECT c.category, e.item_id, sum(w.weight) AS score
                FROM events e JOIN w USING (event_type) JOIN catalog c USING (item_id)
                GROUP BY c.category, e.item_id
            )
            SELECT category, item_id, score FROM scored
            QUALIFY row_number() OVER (PARTITION BY category ORDER BY score DESC, item_id) <= {int(top_n)}"""
        return con.sql(sql).to_arrow_table()


def nested(table: pa.Table, key: str, other: str, value: str) -> dict[str, dict[str, float]]:
    """A long table as key -> {other: value}, the shape the candidate generators take."""
    out: dict[str, dict[str, float]] = {}
    for k, o, v in zip(table[key].to_pylist(), table[other].to_pylist(), table[value].to_pylist(), strict=True):
        out.setdefault(k, {})[o] = float(v)
    return out
