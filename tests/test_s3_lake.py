"""The lake and the registry on a real S3-protocol server (moto's standalone server on loopback, the
stand-in for compose's MinIO), configured as a deployment is: RECS_LAKE__ROOT / RECS_MODELS__ROOT
s3:// URLs, the endpoint from FSSPEC_S3_ENDPOINT_URL, AWS_* credentials.

S3 has no rename, so a file is published by one upload that appears whole when it completes; a writer
killed mid-upload leaves no object, and one killed after its upload but before its ack is deduplicated
on restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from typer.testing import CliRunner

from common import redis_keys
from common.events import Event, EventType, deterministic_event_id, events_to_table
from common.lake import EVENTS_DATASET, Lake
from common.model import load_model
from common.redis_server import RedisServer
from common.registry import Registry
from common.settings import get_settings
from common.stream import decode_entry, group_lag
from tests.conftest import S3Bucket
from tests.s3_support import MotoServer, UploadStaller, s3_env
from tests.speed_factories import add_events, make_event, publish_model, speed_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = datetime(2026, 3, 1, 12, tzinfo=UTC)


def batch(*numbers: int) -> pa.Table:
    return events_to_table(
        [
            Event(
                event_id=deterministic_event_id("s3-test", n), event_type=EventType.VIEW, ts=DAY,
                received_at=DAY, anonymous_id=f"a{n % 3}", item_id=f"p{n}",
            )  # fmt: skip
            for n in numbers
        ]
    )


def objects(lake: Lake) -> list[str]:
    """Every object in the lake's bucket, as a reader listing it would find it."""
    bucket = lake.root.split("/", 1)[0]
    return sorted(lake.fs.find(bucket))


def test_the_lake_on_s3_writes_each_batch_once_and_reads_it_back(s3_bucket: S3Bucket) -> None:
    lake = Lake(s3_bucket.url("lake"))
    assert lake.is_object_store
    before = datetime.now(UTC)
    first = lake.write_events(batch(1, 2, 3))
    assert lake.write_events(batch(3, 2, 1)) == []  # the same rows again: nothing new
    # Checked only against the files written since `before`, whose listed times S3 cuts to the second.
    assert lake.write_events(batch(3, 4), written_since=before) != []  # only 4 is new
    assert sorted(lake.read_events()["item_id"].to_pylist()) == ["p1", "p2", "p3", "p4"]
    assert lake.partitions(EVENTS_DATASET) == [DAY.date()]
    # Only the published files: no temp object was ever made to be renamed.
    assert objects(lake) == sorted(lake.partition_files(EVENTS_DATASET, DAY.date()))
    assert first[0] in objects(lake)


def test_a_failed_upload_leaves_no_object(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    lake = Lake(s3_bucket.url("lake"))
    real_write = pq.write_table

    def fail_after_writing(table: pa.Table, where: object, **kwargs: object) -> None:
        real_write(table, where, **kwargs)
        raise OSError("the writer died after the bytes were out")

    monkeypatch.setattr(pq, "write_table", fail_after_writing)
    with pytest.raises(OSError, match="died after"):
        lake.write_events(batch(1, 2))
    monkeypatch.undo()
    assert objects(lake) == [] and lake.read_events().num_rows == 0
    lake.write_events(batch(1, 2))  # and the retry lands
    assert lake.read_events().num_rows == 2


def test_the_lake_writer_killed_mid_upload_and_after_it_loses_and_duplicates_nothing(
    s3_bucket: S3Bucket, s3_server: MotoServer, redis_client: redis.Redis, redis_server: RedisServer, tmp_path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    staller = UploadStaller(s3_server.port)  # the writers reach S3 through it
    uploads = tmp_path / "uploads"  # the writers' temp directory: where their local copies of uploads go
    uploads.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(uploads),
        **s3_env(staller.endpoint),
        "PYTHONPATH": ROOT,
        "RECS_REDIS__URL": redis_server.url,
        "RECS_LAKE__ROOT": s3_bucket.url("lake"),
        "RECS_LAKE__FLUSH_EVENTS": "40",
        "RECS_LAKE__FLUSH_SECONDS": "0.1",
        "RECS_SPEED__CLAIM_IDLE_MS": "200",
        "RECS_SPEED__CLAIM_INTERVAL_S": "0.1",
    }
    command = [sys.executable, "-c", "from speed_layer.cli import lake_writer_run; lake_writer_run()"]
    lake = Lake(s3_bucket.url("lake"))  # the test reads S3 directly
    sent: list[str] = []

    def send(n: int) -> None:
        events = [make_event(EventType.VIEW, f"i{len(sent) % 7}", anonymous_id=f"a{len(sent) + j}") for j in range(n)]
        add_events(redis_client, settings, events)
        sent.extend(e.event_id for e in events)

    def pending_event_ids(writer: subprocess.Popen[bytes]) -> set[str]:
        """The events of the entries `writer` (a lake writer named host-pid) read and did not acknowledge."""
        key = redis_keys.stream(settings.redis.stream)
        name = f"{socket.gethostname()}-{writer.pid}"
        pending = redis_client.xpending_range(key, settings.speed.lake_group, "-", "+", 10_000, consumername=name)
        entries = [e for p in pending for e in redis_client.xrange(key, p["message_id"], p["message_id"])]
        return {decode_entry(fields).event_id for _, fields in entries}

    def landed() -> list[str]:
        return lake.read_events(columns=["event_id"])["event_id"].to_pylist()

    try:
        for hold in ("request", "response"):
            writer = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
            before = len(landed())
            _send_until(lambda n=before: len(landed()) > n, send, 30, "the writer's first file")  # it is up
            staller.arm(hold)
            _send_until(staller.held.is_set, send, 30, f"an upload held at its {hold}")
            files_at_hold = objects(lake)
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            # Its `finally` never ran: the local copy of its held upload is left, and only that one (this
            # writer's first upload removed what the writer killed before it had left).
            assert [f.name.split("-")[2] for f in uploads.iterdir()] == [str(writer.pid)]
            staller.arm(None)
            time.sleep(0.3)  # anything still in flight would land now
            unacked = pending_event_ids(writer)
            assert unacked  # it died holding the entries of the held flush
            if hold == "request":
                assert objects(lake) == files_at_hold  # half an upload never became an object
                assert unacked.isdisjoint(landed())
            else:
                assert unacked <= set(landed())  # the upload landed; its entries wait to be redelivered

        final = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: group_lag(redis_client, settings.redis.stream, settings.speed.lake_group) == 0, 40)
        finally:
            final.send_signal(signal.SIGTERM)
            final.wait(timeout=20)
    finally:
        staller.close()
    assert list(uploads.iterdir()) == []  # the next writer's first upload removed them
    rows = landed()
    assert len(rows) == len(set(rows))  # no duplicate
    assert sorted(rows) == sorted(sent)  # no loss
    assert all(p.endswith(".parquet") and "/events/dt=" in p for p in objects(lake))  # and no litter


def _send_until(done: Callable[[], bool], send: Callable[[int], None], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        send(10)
        time.sleep(0.05)


def _wait_for(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_the_registry_on_s3_publishes_switches_and_rolls_back(
    s3_bucket: S3Bucket, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recs.main import app

    monkeypatch.setenv("RECS_MODELS__ROOT", s3_bucket.url("models"))
    monkeypatch.setenv("RECS_REDIS__URL", redis_server.url)
    get_settings.cache_clear()
    registry = Registry(get_settings().models.root)
    items = np.arange(12, dtype=np.float32).reshape(4, 3)
    publish_model(registry, "v1", DAY, items, ["u1"])
    publish_model(registry, "v2", DAY, items * 2, ["u1"])
    assert registry.current() == "v2" and registry.versions() == ["v1", "v2"]
    registry.verify("v2")  # every artifact's hash, read back from S3, matches the manifest
    assert np.array_equal(load_model(registry, "v2").item_factors, items * 2)

    done = CliRunner().invoke(app, ["model", "rollback"])
    assert done.exit_code == 0, done.output
    assert "rolled back from v2 to v1" in done.output
    assert Registry(s3_bucket.url("models")).current() == "v1"  # a fresh reader sees the switch
    assert [h["kind"] for h in registry.history()] == ["activated", "activated", "rolled_back"]
    done = CliRunner().invoke(app, ["model", "activate", "v2"])
    assert done.exit_code == 0 and registry.current() == "v2"
    get_settings.cache_clear()


def test_erasure_rewrites_partitions_on_s3(s3_bucket: S3Bucket) -> None:
    from spark_jobs.erasure import apply_erasures

    lake = Lake(s3_bucket.url("lake"))
    lake.write_events(events_to_table([
        Event(event_id=deterministic_event_id("s3-erase", n), event_type=EventType.VIEW, ts=DAY, received_at=DAY,
              anonymous_id=f"dev{n}", user_id="alice" if n % 2 else None, item_id=f"p{n}")
        for n in range(6)
    ]))  # fmt: skip
    lake.queue_erasure("alice")
    report = apply_erasures(lake)
    assert report.users == ["alice"] and report.rows_removed == 3
    assert lake.read_events()["anonymous_id"].to_pylist() == ["dev0", "dev2", "dev4"]
    assert lake.pending_erasures() == []
    assert len(lake.partition_files(EVENTS_DATASET, DAY.date())) == 1  # the old file went after the new one
