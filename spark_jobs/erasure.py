"""Right to erasure: rewrite the lake partitions that hold queued users' events, forget their factors
in every model version, then close the requests (Lake.close_erasures keeps the id's digest and the
time, which serving reads).

A user's events include those of every device (anonymous_id) that identified as the user, so the
pre-login part of their sessions goes too. Impressions served to them are erased as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from common.lake import EVENTS_DATASET, IMPRESSIONS_DATASET, Dataset, Lake
from common.model import forget_users
from common.registry import Registry
from spark_jobs.quality import DataQualityError


class ErasureIncomplete(DataQualityError):
    """Some partitions could not be read (corrupt or drifted files); the others are erased and the
    requests stay queued for the next run."""


@dataclass
class ErasureReport:
    users: list[str] = field(default_factory=list)
    rows_removed: int = 0
    partitions_rewritten: list[str] = field(default_factory=list)
    factor_rows_forgotten: int = 0
    unreadable: list[str] = field(default_factory=list)


def apply_erasures(lake: Lake, registries: Sequence[Registry] = ()) -> ErasureReport:
    """Erase every queued user from every partition that can be read and from every version of the
    registries (their factor rows, and their devices'). The requests are closed only when all could:
    a partition that validation fails as corrupt or drifted keeps them queued, and ErasureIncomplete
    names it once the others are rewritten (erasure runs whatever the data's quality)."""
    pending = lake.pending_erasures()
    report = ErasureReport(users=sorted({p["user_id"] for p in pending}))
    if not pending:
        return report
    users = pa.array(report.users, pa.string())
    devices = _devices_of(lake, users, report)
    for dataset in (EVENTS_DATASET, IMPRESSIONS_DATASET):
        for day in lake.partitions(dataset):
            table = _read(lake, dataset, day, report)
            if table is None:
                continue
            erased = _belongs_to(table, users, devices)
            removed = pc.sum(erased.cast(pa.int64())).as_py() or 0
            if removed:
                lake.rewrite_partition(dataset, day, table.filter(pc.invert(erased)))
                report.rows_removed += removed
                report.partitions_rewritten.append(f"{dataset.name}/dt={day}")
    people = {*report.users, *devices.to_pylist()}
    for registry in registries:
        for version in registry.versions():
            report.factor_rows_forgotten += forget_users(registry, version, people)
    if report.unreadable:
        raise ErasureIncomplete(
            f"erasure of {len(report.users)} user(s) incomplete, kept queued: cannot read {', '.join(report.unreadable)}"
        )
    lake.close_erasures(pending)
    return report


def _read(
    lake: Lake, dataset: Dataset, day: date, report: ErasureReport, columns: list[str] | None = None
) -> pa.Table | None:
    """The partition, or None when it is empty or cannot be read (noted in the report)."""
    files = lake.partition_files(dataset, day)
    if not files:
        return None
    try:
        data = ds.dataset(files, schema=dataset.schema, format="parquet", filesystem=lake.fs)
        return data.to_table(columns=columns)
    except (pa.ArrowException, OSError):
        name = f"{dataset.name}/dt={day}"
        if name not in report.unreadable:
            report.unreadable.append(name)
        return None


def _devices_of(lake: Lake, users: pa.Array, report: ErasureReport) -> pa.Array:
    """Every anonymous_id seen together with one of the users (in the partitions that can be read)."""
    found: set[str] = set()
    for day in lake.partitions(EVENTS_DATASET):
        events = _read(lake, EVENTS_DATASET, day, report, columns=["anonymous_id", "user_id"])
        if events is not None:
            mine = events.filter(pc.is_in(events["user_id"], value_set=users))
            found.update(mine["anonymous_id"].to_pylist())
    return pa.array(sorted(found), pa.string())


def _belongs_to(table: pa.Table, users: pa.Array, devices: pa.Array) -> pa.ChunkedArray:
    by_user = pc.fill_null(pc.is_in(table["user_id"], value_set=users), False)
    by_device = pc.fill_null(pc.is_in(table["anonymous_id"], value_set=devices), False)
    return pc.or_(by_user, by_device)
