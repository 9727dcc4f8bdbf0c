"""Right to erasure: rewrite the lake partitions that hold queued users' events, then close the requests
(Lake.close_erasures keeps the id's digest and the time, which serving reads).

A user's events include those of every device (anonymous_id) that identified as the user, so the
pre-login part of their sessions goes too. Impressions served to them are erased as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from common.lake import EVENTS_DATASET, IMPRESSIONS_DATASET, Lake


@dataclass
class ErasureReport:
    users: list[str] = field(default_factory=list)
    rows_removed: int = 0
    partitions_rewritten: list[str] = field(default_factory=list)


def apply_erasures(lake: Lake) -> ErasureReport:
    """Erase every queued user; the requests are closed only after all their partitions are rewritten."""
    pending = lake.pending_erasures()
    report = ErasureReport(users=sorted({p["user_id"] for p in pending}))
    if not pending:
        return report
    users = pa.array(report.users, pa.string())
    devices = _devices_of(lake, users)
    for dataset in (EVENTS_DATASET, IMPRESSIONS_DATASET):
        for day in lake.partitions(dataset):
            files = lake.partition_files(dataset, day)
            if not files:
                continue
            table = ds.dataset(files, schema=dataset.schema, format="parquet", filesystem=lake.fs).to_table()
            erased = _belongs_to(table, users, devices)
            removed = pc.sum(erased.cast(pa.int64())).as_py() or 0
            if removed:
                lake.rewrite_partition(dataset, day, table.filter(pc.invert(erased)))
                report.rows_removed += removed
                report.partitions_rewritten.append(f"{dataset.name}/dt={day}")
    lake.close_erasures(pending)
    return report


def _devices_of(lake: Lake, users: pa.Array) -> pa.Array:
    """Every anonymous_id seen together with one of the users."""
    events = lake.read_events(columns=["anonymous_id", "user_id"])
    mine = events.filter(pc.is_in(events["user_id"], value_set=users))
    return pc.unique(mine["anonymous_id"].combine_chunks()) if mine.num_rows else pa.array([], pa.string())


def _belongs_to(table: pa.Table, users: pa.Array, devices: pa.Array) -> pa.ChunkedArray:
    by_user = pc.fill_null(pc.is_in(table["user_id"], value_set=users), False)
    by_device = pc.fill_null(pc.is_in(table["anonymous_id"], value_set=devices), False)
    return pc.or_(by_user, by_device)
