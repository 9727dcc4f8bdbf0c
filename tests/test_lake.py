"""The Parquet lake: idempotent, atomic writes, dedup by event_id, partitions by received_at."""

from __future__ import annotations

import hashlib
import os
import threading
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import redis

from common.catalog import Item, items_to_table
from common.events import Event, EventType, deterministic_event_id, events_to_table
from common.lake import EVENTS_DATASET, Lake
from common.redis_server import RedisServer
from speed_layer.lake_writer import LakeWriter
from tests.speed_factories import add_events, make_event, speed_settings

DAY1 = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)


def event(n: int, received_at: datetime = DAY1, ts: datetime | None = None) -> Event:
    return Event(
        event_id=deterministic_event_id("lake-test", n),
        event_type=EventType.VIEW,
        ts=ts or received_at,
        received_at=received_at,
        anonymous_id=f"a{n % 3}",
        item_id=f"p{n}",
    )


def batch(*numbers: int, received_at: datetime = DAY1) -> pa.Table:
    return events_to_table([event(n, received_at) for n in numbers])


def files_of(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_the_same_batch_twice_gives_the_same_files_and_rows(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "a"))
    first = lake.write_events(batch(1, 2, 3))
    assert len(first) == 1
    before = files_of(tmp_path / "a")
    assert lake.write_events(batch(3, 1, 2)) == []  # any order: nothing new
    assert files_of(tmp_path / "a") == before
    assert sorted(lake.read_events()["item_id"].to_pylist()) == ["p1", "p2", "p3"]
    Lake(str(tmp_path / "b")).write_events(batch(2, 3, 1))
    assert files_of(tmp_path / "b") == before  # deterministic names and bytes


def test_dedup_by_event_id_within_and_across_batches(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_events(pa.concat_tables([batch(1, 2), batch(2)]))
    lake.write_events(batch(2, 3))
    ids = lake.read_events()["event_id"].to_pylist()
    assert sorted(ids) == sorted(deterministic_event_id("lake-test", n) for n in (1, 2, 3))
    assert len(lake.partition_files(EVENTS_DATASET, DAY1.date())) == 2  # the second file holds only event 3


def test_a_flush_holding_duplicates_keeps_the_first_row_of_each_event(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    a, b, c, d = (event(n, received_at=DAY1 - timedelta(seconds=10 - n)) for n in (1, 2, 3, 4))
    a_again = a.model_copy(update={"item_id": "p1-retried"})  # shows which of the two copies was kept
    lake.write_events(events_to_table([a, b, a_again, c, d]))
    rows = lake.read_events(columns=["event_id", "item_id"]).to_pylist()
    assert [(r["event_id"], r["item_id"]) for r in rows] == [(e.event_id, e.item_id) for e in (a, b, c, d)]


def test_a_batch_retried_into_the_stream_lands_in_the_lake_once(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # The API died after its XADD and the client sent the batch again: one flush reads it twice,
    # between other batches.
    settings = speed_settings(tmp_path, redis_server.url)
    first, retried, last = ([make_event(EventType.VIEW, f"i{n}") for n in range(k, k + 5)] for k in (0, 5, 10))
    for batch_ in (first, retried, retried, last):
        add_events(redis_client, settings, batch_)
    writer = LakeWriter(redis_client, settings, name="w1")
    while writer.poll_once():
        pass
    writer.flush()
    landed = Lake(settings.lake.root).read_events(columns=["event_id"])["event_id"].to_pylist()
    assert sorted(landed) == sorted(e.event_id for e in first + retried + last)


def test_a_write_since_a_moment_checks_only_the_files_written_since(tmp_path: Path) -> None:
    """What the lake writer's flush reads stays flat over the day: the files written since its window
    began, across midnight too, not every file of the partition."""
    lake = Lake(str(tmp_path))
    day2 = DAY1 + timedelta(seconds=2)
    since = DAY1 - timedelta(hours=1)
    (old,) = lake.write_events(batch(1, 2, received_at=day2))
    os.utime(old, (since.timestamp() - 60, since.timestamp() - 60))  # written before the window
    (before_midnight,) = lake.write_events(batch(3))
    (after_midnight,) = lake.write_events(batch(4, received_at=day2))

    assert lake.files_written_since(EVENTS_DATASET, since, day2.date()) == sorted([before_midnight, after_midnight])
    # A retry of event 3 accepted after midnight, beside a new event: the retry is dropped.
    lake.write_events(batch(3, 5, received_at=day2), written_since=since)
    ids = lake.read_events()["event_id"].to_pylist()
    assert sorted(ids) == sorted(deterministic_event_id("lake-test", n) for n in (1, 2, 3, 4, 5))


def test_a_file_listed_in_whole_seconds_counts_as_written_in_the_window_it_began(tmp_path: Path) -> None:
    """S3 lists LastModified in whole seconds: a file written 0.5 s after the window opened may show a
    time 0.5 s before it, and must still be checked."""
    lake = Lake(str(tmp_path))
    (landed,) = lake.write_events(batch(1))
    since = datetime(2026, 3, 2, 12, 0, 0, 500_000, tzinfo=UTC)
    os.utime(landed, (since.timestamp() - 0.5, since.timestamp() - 0.5))  # as S3 would list it
    assert lake.files_written_since(EVENTS_DATASET, since, DAY1.date()) == [landed]
    assert lake.write_events(batch(1), written_since=since) == []


def test_partitions_follow_received_at_not_ts(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    late = event(7, received_at=DAY1 + timedelta(seconds=2), ts=DAY1 - timedelta(days=3))
    lake.write_events(events_to_table([event(1), late]))
    assert lake.partitions(EVENTS_DATASET) == [date(2026, 3, 1), date(2026, 3, 2)]
    day2 = lake.read_events(start=datetime(2026, 3, 2, tzinfo=UTC))
    assert day2["item_id"].to_pylist() == ["p7"]
    day1 = lake.read_events(end=datetime(2026, 3, 2, tzinfo=UTC))
    assert day1["item_id"].to_pylist() == ["p1"]


def test_a_failing_write_leaves_nothing_readable_and_no_litter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = Lake(str(tmp_path))
    real_write = pq.write_table

    def crash_after_writing(table: pa.Table, where, **kwargs) -> None:  # the process dies after the bytes are out
        real_write(table, where, **kwargs)
        raise OSError("disk went away")

    monkeypatch.setattr(pq, "write_table", crash_after_writing)
    with pytest.raises(OSError, match="disk went away"):
        lake.write_events(batch(1, 2))
    monkeypatch.undo()
    assert lake.read_events().num_rows == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    lake.write_events(batch(1, 2))  # and the retry succeeds
    assert lake.read_events().num_rows == 2


def test_readers_skip_files_being_written(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    (target,) = lake.write_events(batch(1))
    partial = Path(target).parent / ".part-in-flight.parquet.tmp"
    partial.write_bytes(Path(target).read_bytes()[:40])  # half a file under a dot-name
    assert lake.read_events().num_rows == 1
    assert lake.write_events(batch(2))  # and writers are not confused by it either


def test_a_starting_lake_writer_removes_the_temp_files_killed_writers_left(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    lake = Lake(settings.lake.root)
    [landed] = lake.write_events(batch(1, 2))
    partition = Path(landed).parent
    stale, running = partition / ".part-a.parquet.1f.tmp", partition / ".part-b.parquet.2e.tmp"
    for leftover in (stale, running):
        leftover.write_bytes(b"half a file")
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).timestamp()
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(landed, (two_hours_ago, two_hours_ago))  # an old data file stays, whatever its age

    stopped = threading.Event()
    stopped.set()
    LakeWriter(redis_client, settings, name="w1").run(stopped)

    assert sorted(p.name for p in partition.iterdir()) == sorted([Path(landed).name, running.name])
    assert lake.read_events().num_rows == 2


def test_bad_batches_are_refused_with_the_column_named(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    table = batch(1)
    with pytest.raises(ValueError, match="missing required column.*received_at"):
        lake.write_events(table.drop_columns(["received_at"]))
    with pytest.raises(ValueError, match="column 'quantity' cannot be read"):
        lake.write_events(table.set_column(table.schema.get_field_index("quantity"), "quantity", pa.array(["two"])))


def test_the_newest_catalog_snapshot_wins(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    created = datetime(2026, 1, 1, tzinfo=UTC)
    lake.write_catalog(items_to_table([Item(item_id="p1", price=5, created_at=created)]), at=created)
    lake.write_catalog(
        items_to_table([Item(item_id="p1", price=6, category_path=["Home", "Lamps"], created_at=created)]),
        at=created + timedelta(days=1),
    )
    catalog = lake.read_catalog().to_pylist()
    assert [(r["item_id"], r["price"], r["category"]) for r in catalog] == [("p1", 6.0, "Lamps")]
    assert len(lake.catalog_snapshots()) == 2


def test_rewrite_partition_replaces_it(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path))
    lake.write_events(batch(1, 2))
    lake.write_events(batch(3))
    kept = lake.read_events().filter(pc.not_equal(lake.read_events()["item_id"], "p2"))
    lake.rewrite_partition(EVENTS_DATASET, DAY1.date(), kept)
    assert sorted(lake.read_events()["item_id"].to_pylist()) == ["p1", "p3"]
    assert len(lake.partition_files(EVENTS_DATASET, DAY1.date())) == 1
