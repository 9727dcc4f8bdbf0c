"""Interactions: one weighted implicit-feedback value per (person, item) from lake events before a cutoff.

The rule is one SQL text run by two engines: Spark (the cluster path) and DuckDB (the one-machine
path of the `implicit` engine). Both read the same lake files, so the two engines train on equal
numbers; a test holds them to it. Per event: r = type weight + capped dwell bonus (the rule of
`common.features.implicit_weight`), decayed by event age at the cutoff; summed per (person, item).
Each pair also carries how many of the person's sessions had it and when it was last engaged with:
the version's person history (`common.model.PersonHistory`) is cut from these rows.
Identity: events of an anonymous_id that later identified as a user count for that user.
Consent: only events sent with personalisation consent build a person's interactions (a file from
before the column holds events sent with the default, personalisation).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from common import duck
from common.events import EVENT_SCHEMA, Consent
from common.lake import EVENTS_DATASET, Lake
from common.settings import TrainingSettings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

COLUMNS = ["event_type", "ts", "received_at", "anonymous_id", "user_id", "session_id", "item_id", "dwell_ms", "consent"]
INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("sessions", pa.int64(), nullable=False),  # distinct sessions (else devices) with a weighted event
        pa.field("last_s", pa.float64(), nullable=False),  # epoch seconds of the last weighted event
    ]
)


def _lit(x: float) -> str:
    # Exponent notation is a DOUBLE literal in both Spark SQL and DuckDB (plain 1.5 is DECIMAL in Spark).
    return f"{float(x):.17e}"


def interactions_sql(cutoff: datetime, training: TrainingSettings, epoch_us: str) -> str:
    """The rule over a view named `events`; `epoch_us` is the engine's timestamp -> microseconds function."""
    cutoff_us = int(cutoff.astimezone(UTC).timestamp() * 1_000_000)
    cases = " ".join(f"WHEN '{name}' THEN {_lit(w)}" for name, w in sorted(training.weights.items()))
    half_life_s = training.half_life_days * 86_400.0
    return f"""
WITH ev AS (
    SELECT event_type, {epoch_us}(ts) / {_lit(1e6)} AS ts_s, anonymous_id, user_id, item_id, dwell_ms,
           coalesce(session_id, anonymous_id) AS sid
    FROM events
    WHERE {epoch_us}(received_at) < {cutoff_us}
      AND coalesce(consent, '{Consent.PERSONALISATION.value}') = '{Consent.PERSONALISATION.value}'
),
alias AS (  -- each device's most recent login before the cutoff
    SELECT anonymous_id, user_id FROM (
        SELECT anonymous_id, user_id,
               row_number() OVER (PARTITION BY anonymous_id ORDER BY ts_s DESC, user_id DESC) AS rn
        FROM ev WHERE user_id IS NOT NULL
    ) latest WHERE rn = 1
),
weighted AS (
    SELECT coalesce(ev.user_id, alias.user_id, ev.anonymous_id) AS person_id,
           ev.item_id, ev.sid, ev.ts_s,
           CASE ev.event_type {cases} ELSE {_lit(0)} END AS base,
           CASE WHEN ev.dwell_ms > 0
                THEN least({_lit(training.dwell_bonus_cap)},
                           {_lit(training.dwell_bonus_per_minute)} * ev.dwell_ms / {_lit(60_000)})
                ELSE {_lit(0)} END AS bonus,
           greatest({_lit(0)}, {_lit(cutoff_us / 1e6)} - ev.ts_s) AS age_s
    FROM ev LEFT JOIN alias ON ev.anonymous_id = alias.anonymous_id
    WHERE ev.item_id IS NOT NULL
)
SELECT person_id, item_id, sum((base + bonus) * power({_lit(0.5)}, age_s / {_lit(half_life_s)})) AS value,
       count(DISTINCT sid) AS sessions, max(ts_s) AS last_s
FROM weighted
WHERE base > 0
GROUP BY person_id, item_id
"""


def event_files(lake: Lake, cutoff: datetime) -> list[str]:
    """Lake files that may hold events received before the cutoff (partitions are by received_at day)."""
    last_day = cutoff.astimezone(UTC).date()
    files: list[str] = []
    for day in lake.partitions(EVENTS_DATASET):
        if day <= last_day:
            files.extend(lake.partition_files(EVENTS_DATASET, day))
    return files


def local_interactions(lake: Lake, cutoff: datetime, training: TrainingSettings) -> pa.Table:
    """The rule on DuckDB over the lake's Arrow data (one machine; the `implicit` engine's path)."""

    events = lake.read_events(end=cutoff, columns=COLUMNS)
    with duck.connect() as con:
        con.register("events", events)
        sql = interactions_sql(cutoff, training, "epoch_us") + " ORDER BY person_id, item_id"
        table = con.sql(sql).to_arrow_table()
    return table.cast(INTERACTIONS_SCHEMA)


def spark_interactions(spark: SparkSession, lake: Lake, cutoff: datetime, training: TrainingSettings) -> DataFrame:
    """The rule on Spark; returns a DataFrame (person_id, item_id, value, sessions, last_s)."""
    files = event_files(lake, cutoff)
    if not files:
        return spark.createDataFrame([], "person_id string, item_id string, value double, sessions long, last_s double")
    from pyspark.sql.pandas.types import from_arrow_schema

    # The lake's schema, not a file's: a file from before a column was added reads it as null.
    schema = from_arrow_schema(pa.schema([EVENT_SCHEMA.field(c) for c in COLUMNS]))
    events = spark.read.schema(schema).parquet(*[_spark_path(lake, f) for f in files])
    events.createOrReplaceTempView("events")
    return spark.sql(interactions_sql(cutoff, training, "unix_micros"))


def spark_to_arrow(frame: DataFrame) -> pa.Table:
    """Collect a (small) Spark result as Arrow, ordered like the DuckDB one."""
    rows: list[Any] = frame.orderBy("person_id", "item_id").collect()
    return pa.Table.from_pylist([r.asDict() for r in rows], schema=INTERACTIONS_SCHEMA)


def _spark_path(lake: Lake, path: str) -> str:
    protocol = lake.fs.protocol[0] if isinstance(lake.fs.protocol, tuple) else lake.fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"
