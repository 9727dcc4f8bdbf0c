"""The Parquet event lake: hive-partitioned datasets on any fsspec filesystem.

Layout under the lake root:
    events/dt=YYYY-MM-DD/part-<hash>.parquet       partitioned by received_at (UTC day)
    impressions/dt=YYYY-MM-DD/part-<hash>.parquet  every served list, partitioned by served_at
    catalog/snapshot=<UTC stamp>/items.parquet     full catalog snapshots; the newest wins
    erasures/<digest>.json                         GDPR erase requests (user id, time), applied by the batch run
    erasures/applied.json                          the applied ones: id digest -> request time, never the id

Writes are idempotent and atomic: a batch's file name is a hash of its keys, rows whose key
is already in the partition (or, for a writer that says since when a row could have been
written, in the files written since then) are dropped, and each file is written under a dot-name
and then renamed, so readers (pyarrow, DuckDB, Spark all skip dot-files) never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from common.events import EVENT_SCHEMA
from common.ids import id_digest
from common.storage import TEMP_SUFFIX, Store

EVENTS = "events"
IMPRESSIONS = "impressions"
CATALOG = "catalog"
ERASURES = "erasures"
APPLIED_ERASURES = "applied.json"


@dataclass(frozen=True)
class Dataset:
    """A partitioned table in the lake: its name, key column and the timestamp it is split by."""

    name: str
    key: str
    time_column: str
    schema: pa.Schema
    # Check each write against the partition's existing keys. Events need it (a consumer may redeliver
    # after a crash); impressions do not (a request id is served once, and a retried flush of the same
    # rows lands under the same content-named file), and the check would re-read the whole day each flush.
    drop_existing_keys: bool = True


IMPRESSION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("served_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string()),
        pa.field("anonymous_id", pa.string()),
        pa.field("session_id", pa.string()),
        pa.field("context", pa.string()),
        pa.field("variant", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("degraded", pa.string()),
        pa.field("items", pa.list_(pa.string()), nullable=False),
        pa.field("scores", pa.list_(pa.float64())),
        pa.field("sources", pa.list_(pa.string())),
    ]
)

EVENTS_DATASET = Dataset(EVENTS, "event_id", "received_at", EVENT_SCHEMA)
IMPRESSIONS_DATASET = Dataset(IMPRESSIONS, "request_id", "served_at", IMPRESSION_SCHEMA, drop_existing_keys=False)


class Lake(Store):
    """Read and write the lake under one root URL (a local path by default)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        # The keys of each file a windowed write checked against, while it stays in the window: a
        # writer reads each file once, and what it holds is bounded by the window, not the day.
        self._keys_of_file: dict[str, pa.Array] = {}

    # ------------------------------------------------------------ partitioned datasets

    def partitions(self, dataset: Dataset) -> list[date]:
        """The dt= partitions present, oldest first."""
        base = self.path(dataset.name)
        if not self.fs.exists(base):
            return []
        days = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("dt="):
                days.append(date.fromisoformat(name[3:]))
        return sorted(days)

    def partition_files(self, dataset: Dataset, day: date) -> list[str]:
        directory = self.path(dataset.name, f"dt={day.isoformat()}")
        if not self.fs.exists(directory):
            return []
        return sorted(
            p for p in self.fs.ls(directory, detail=False) if p.endswith(".parquet") and not _hidden(p)
        )

    def write(self, dataset: Dataset, table: pa.Table, written_since: datetime | None = None) -> list[str]:
        """Write a batch; returns the files created. Writing the same rows again creates nothing.

        `written_since`: no earlier copy of these rows can have been written before this moment, so
        they are checked against the files written since (in any partition from that day on), not
        against their whole partition: the check reads what a retry could repeat, not the whole day."""
        table = _conform(table, dataset.schema)
        table = _dedup_within(table, dataset.key)
        if table.num_rows == 0:
            return []
        days = pc.strftime(table[dataset.time_column], format="%Y-%m-%d", locale="C")
        written = []
        for day_str in sorted(set(days.to_pylist())):
            day = date.fromisoformat(day_str)
            part = table.filter(pc.equal(days, day_str))
            if dataset.drop_existing_keys:
                part = self._drop_existing(dataset, day, part, written_since)
            if part.num_rows == 0:
                continue
            part = part.sort_by([(dataset.time_column, "ascending"), (dataset.key, "ascending")])
            name = f"part-{_digest(part[dataset.key].to_pylist())}.parquet"
            target = self.path(dataset.name, f"dt={day_str}", name)
            if not self.fs.exists(target):
                self._atomic_write(part, target)
                written.append(target)
        return written

    def read(
        self,
        dataset: Dataset,
        start: datetime | None = None,
        end: datetime | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Rows with start <= time_column < end (either bound optional), in the dataset's schema."""
        files = []
        for day in self.partitions(dataset):
            if start and day < start.astimezone(UTC).date():
                continue
            if end and day > end.astimezone(UTC).date():
                continue
            files.extend(self.partition_files(dataset, day))
        schema = dataset.schema
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        data = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
        condition = None
        column = ds.field(dataset.time_column)
        if start is not None:
            condition = column >= pa.scalar(start, type=schema.field(dataset.time_column).type)
        if end is not None:
            upper = column < pa.scalar(end, type=schema.field(dataset.time_column).type)
            condition = upper if condition is None else condition & upper
        return data.to_table(columns=columns, filter=condition)

    def rewrite_partition(self, dataset: Dataset, day: date, table: pa.Table) -> None:
        """Replace a whole partition (used by erasure): new file first, then the old ones go."""
        old = self.partition_files(dataset, day)
        table = _conform(table, dataset.schema)
        if table.num_rows:
            name = f"part-{_digest(table[dataset.key].to_pylist())}.parquet"
            target = self.path(dataset.name, f"dt={day.isoformat()}", name)
            self._atomic_write(table, target)
            old = [p for p in old if p != target]
        for path in old:
            self.fs.rm(path)

    # ------------------------------------------------------------ events and impressions

    def event_days(self) -> list[date]:
        return self.partitions(EVENTS_DATASET)

    def write_events(self, table: pa.Table, written_since: datetime | None = None) -> list[str]:
        return self.write(EVENTS_DATASET, table, written_since)

    def read_events(
        self, start: datetime | None = None, end: datetime | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        return self.read(EVENTS_DATASET, start, end, columns)

    def write_impressions(self, table: pa.Table) -> list[str]:
        return self.write(IMPRESSIONS_DATASET, table)

    def read_impressions(self, start: datetime | None = None, end: datetime | None = None) -> pa.Table:
        return self.read(IMPRESSIONS_DATASET, start, end)

    # ------------------------------------------------------------ catalog snapshots

    def write_catalog(self, table: pa.Table, at: datetime | None = None) -> str:
        from common.catalog import CATALOG_SCHEMA  # the catalog module owns its schema

        stamp = (at or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path(CATALOG, f"snapshot={stamp}", "items.parquet")
        self._atomic_write(_conform(table, CATALOG_SCHEMA), target)
        return target

    def catalog_snapshots(self) -> list[str]:
        base = self.path(CATALOG)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n[len("snapshot=") :] for n in names if n.startswith("snapshot="))

    def read_catalog(self) -> pa.Table:
        """The newest catalog snapshot (empty table if there is none)."""
        from common.catalog import CATALOG_SCHEMA

        snapshots = self.catalog_snapshots()
        if not snapshots:
            return CATALOG_SCHEMA.empty_table()
        with self.fs.open(self.path(CATALOG, f"snapshot={snapshots[-1]}", "items.parquet"), "rb") as f:
            return _conform(pq.read_table(f), CATALOG_SCHEMA)

    # ------------------------------------------------------------ erasure queue

    def queue_erasure(self, user_id: str, requested_at: datetime | None = None) -> str:
        target = self.path(ERASURES, f"{id_digest(user_id)}.json")
        body = json.dumps({"user_id": user_id, "requested_at": (requested_at or datetime.now(UTC)).isoformat()})
        self.write_bytes(target, body.encode())
        return target

    def pending_erasures(self) -> list[dict[str, str]]:
        base = self.path(ERASURES)
        if not self.fs.exists(base):
            return []
        out = []
        for p in sorted(self.fs.ls(base, detail=False)):
            if p.endswith(".json") and not _hidden(p) and not p.endswith(f"/{APPLIED_ERASURES}"):
                with self.fs.open(p, "rb") as f:
                    out.append({**json.loads(f.read()), "path": p})
        return out

    def close_erasures(self, applied: list[dict[str, str]]) -> None:
        """Record the applied requests in erasures/applied.json (the id's digest and the request's time:
        serving keeps ignoring the person's batch factors until a version with a later cutoff serves),
        then take them off the queue."""
        times = self._applied_erasures()
        for entry in applied:
            digest = id_digest(entry["user_id"])
            times[digest] = max(times.get(digest, entry["requested_at"]), entry["requested_at"], key=_instant)
        self.write_bytes(self.path(ERASURES, APPLIED_ERASURES), json.dumps(times, sort_keys=True).encode())
        for entry in applied:
            self.fs.rm(entry["path"])

    def erasure_times(self) -> dict[str, datetime]:
        """id digest (ids.id_digest) -> when the person's latest erasure was requested, queued or applied."""
        times = {digest: _instant(at) for digest, at in self._applied_erasures().items()}
        for entry in self.pending_erasures():
            digest, at = id_digest(entry["user_id"]), _instant(entry["requested_at"])
            times[digest] = max(times.get(digest, at), at)
        return times

    def _applied_erasures(self) -> dict[str, str]:
        target = self.path(ERASURES, APPLIED_ERASURES)
        if not self.fs.exists(target):
            return {}
        with self.fs.open(target, "rb") as f:
            times: dict[str, str] = json.loads(f.read())
        return times

    # ------------------------------------------------------------ internals

    def files_written_since(self, dataset: Dataset, since: datetime, last_day: date) -> list[str]:
        """The dataset's files modified at or after `since` in the partitions from since's day (or
        `last_day`, if earlier) to `last_day`; a file whose store gives no time is included."""
        first = min(since.astimezone(UTC).date(), last_day)
        # Object stores list modification times in whole seconds (S3's LastModified): a file written in
        # since's second may show an earlier time.
        since_s = math.floor(since.timestamp())
        out = []
        for day in self.partitions(dataset):
            if not first <= day <= last_day:
                continue
            for info in self.fs.ls(self.path(dataset.name, f"dt={day.isoformat()}"), detail=True):
                path = info["name"]
                modified = _modified_s(info)
                recent = modified is None or modified >= since_s
                if path.endswith(".parquet") and not _hidden(path) and recent:
                    out.append(path)
        return sorted(out)

    def remove_stale_temp_files(self, dataset: Dataset, older_than: datetime) -> int:
        """Remove the temp files that writers killed mid-write left in the dataset's partitions (those
        last modified before `older_than`, which no write still running can be); returns how many."""
        removed = 0
        for day in self.partitions(dataset):
            for info in self.fs.ls(self.path(dataset.name, f"dt={day.isoformat()}"), detail=True):
                modified = _modified_s(info)
                if _is_temp(info["name"]) and modified is not None and modified < older_than.timestamp():
                    self.fs.rm(info["name"])
                    removed += 1
        return removed

    def _drop_existing(
        self, dataset: Dataset, day: date, part: pa.Table, since: datetime | None
    ) -> pa.Table:
        if since is None:
            files = self.partition_files(dataset, day)
            if not files:
                return part
            existing = ds.dataset(files, format="parquet", filesystem=self.fs).to_table(columns=[dataset.key])
            keys = existing[dataset.key].combine_chunks()
        else:
            keys = self._keys_written_since(dataset, since, day)
        seen = pc.is_in(part[dataset.key], value_set=keys)
        return part.filter(pc.invert(seen))

    def _keys_written_since(self, dataset: Dataset, since: datetime, day: date) -> pa.Array:
        """The keys of the files written since `since`: those read before come from memory, and the
        files that left the window leave it."""
        files = self.files_written_since(dataset, since, day)
        for path in files:
            if path not in self._keys_of_file:
                table = pq.read_table(path, columns=[dataset.key], filesystem=self.fs)
                self._keys_of_file[path] = table[dataset.key].combine_chunks()
        window = set(files)
        for path in [p for p in self._keys_of_file if p not in window]:
            del self._keys_of_file[path]
        arrays = [self._keys_of_file[p] for p in files]
        return pa.concat_arrays(arrays) if arrays else pa.array([], dataset.schema.field(dataset.key).type)

    def _atomic_write(self, table: pa.Table, target: str) -> None:
        self.write_atomic(target, lambda f: pq.write_table(table, f, compression="zstd"))


def _instant(iso: str) -> datetime:
    moment = datetime.fromisoformat(iso)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _modified_s(info: dict[str, Any]) -> float | None:
    """A listed file's modification time (epoch s): local stores give `mtime`, S3 `LastModified`."""
    value = info.get("mtime", info.get("LastModified"))
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, int | float) else None


def _is_temp(path: str) -> bool:
    """A file Store.write_atomic is writing, or one a killed writer left."""
    name = path.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _hidden(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith((".", "_"))


def _digest(keys: Iterable[object]) -> str:
    h = hashlib.sha256()
    for key in sorted(str(k) for k in keys):
        h.update(key.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast to the schema; a missing required column or a bad type is a clear error."""
    missing = [f.name for f in schema if f.name not in table.column_names and not f.nullable]
    if missing:
        raise ValueError(f"batch is missing required column(s): {', '.join(missing)}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table[field.name]
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"column {field.name!r} cannot be read as {field.type}: {exc}") from None
            if not field.nullable and column.null_count:
                raise ValueError(f"column {field.name!r} has {column.null_count} null value(s)")
        else:
            column = pa.nulls(table.num_rows, field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _dedup_within(table: pa.Table, key: str) -> pa.Table:
    """Keep the first row of each key."""
    if table.num_rows == 0:
        return table
    index = pa.array(range(table.num_rows), pa.int64())
    firsts = (
        pa.table({"k": table[key], "i": index}).group_by("k", use_threads=False).aggregate([("i", "min")])["i_min"]
    )
    if len(firsts) == table.num_rows:
        return table
    return table.take(firsts.sort())  # the first rows themselves, in their input order
