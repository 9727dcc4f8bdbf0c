"""Data-quality gate of the nightly run: the lake's event partitions must be readable, in schema and
of a plausible size before anything trains. A failure names the partition and the reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq

from common.events import ADDED_COLUMNS, EVENT_SCHEMA
from common.lake import EVENTS_DATASET, Lake

TRAILING_DAYS = 7
MIN_TRAILING = 3  # fewer trailing days than this: too little history to judge volume


class DataQualityError(RuntimeError):
    """The lake is not fit to train on; the message says which partition and why."""


@dataclass
class PartitionReport:
    day: date
    files: int
    rows: int


def validate_events(lake: Lake, cutoff: datetime, volume_factor: float) -> list[PartitionReport]:
    """Check every events partition before the cutoff; raise DataQualityError listing each problem."""
    cutoff = cutoff.astimezone(UTC)
    last_day = (cutoff - timedelta(days=1)).date()  # the newest complete day before the cutoff
    problems: list[str] = []
    reports: list[PartitionReport] = []
    for day in lake.partitions(EVENTS_DATASET):
        if datetime.combine(day, datetime.min.time(), tzinfo=UTC) >= cutoff:
            continue
        report, errors = _check_partition(lake, day)
        problems.extend(errors)
        reports.append(report)
    by_day = {r.day: r for r in reports}
    if last_day not in by_day:
        problems.append(f"partition events/dt={last_day} is missing: the run's last day has no events")
    elif by_day[last_day].rows > 0 and not problems:
        problems.extend(_check_volume(by_day, last_day, volume_factor))
    if problems:
        raise DataQualityError("lake validation failed: " + "; ".join(problems))
    return reports


def _check_partition(lake: Lake, day: date) -> tuple[PartitionReport, list[str]]:
    name = f"events/dt={day}"
    files = lake.partition_files(EVENTS_DATASET, day)
    errors: list[str] = []
    rows = 0
    for path in files:
        short = path.rsplit("/", 1)[-1]
        try:
            with lake.fs.open(path, "rb") as f:
                meta = pq.read_metadata(f)
            schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            errors.append(f"partition {name}: file {short} is corrupt ({exc})")
            continue
        drift = _schema_drift(schema)
        if drift:
            errors.append(f"partition {name}: file {short} has schema drift ({drift})")
        rows += meta.num_rows
    if not errors and rows == 0:
        errors.append(f"partition {name} is empty ({len(files)} file(s), 0 rows)")
    return PartitionReport(day, len(files), rows), errors


def _schema_drift(schema: pa.Schema) -> str:
    """What differs from the event contract, or '' when nothing does."""
    diffs = []
    for field in EVENT_SCHEMA:
        if field.name not in schema.names:
            if field.name in ADDED_COLUMNS:
                continue
            diffs.append(f"missing column {field.name}")
        elif not schema.field(field.name).type.equals(field.type):
            diffs.append(f"column {field.name} is {schema.field(field.name).type}, expected {field.type}")
    extra = [n for n in schema.names if n not in EVENT_SCHEMA.names]
    if extra:
        diffs.append(f"unexpected column(s) {', '.join(extra)}")
    return ", ".join(diffs)


def _check_volume(by_day: dict[date, PartitionReport], last_day: date, factor: float) -> list[str]:
    trailing = [by_day[d].rows for d in (last_day - timedelta(days=i) for i in range(1, TRAILING_DAYS + 1)) if d in by_day]
    if len(trailing) < MIN_TRAILING:
        return []
    average = sum(trailing) / len(trailing)
    rows = by_day[last_day].rows
    if rows > average * factor or rows * factor < average:
        return [
            f"partition events/dt={last_day} has {rows:,} events, far off the trailing {len(trailing)}-day "
            f"average of {average:,.0f} (allowed factor {factor:g})"
        ]
    return []
