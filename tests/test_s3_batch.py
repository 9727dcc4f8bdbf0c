"""The batch layer's and the warehouse's reads of a lake on S3 (moto's server, as in test_s3_lake.py):
the implicit engine's nightly steps (validation, interactions, ALS with its popularity and co-visitation
tables, the ranker's training set) read the same lake on S3 as on disk into the same tables, and write
the version into a registry on S3; the DuckDB warehouse's views read it through fsspec. Spark cannot
read S3 here (the S3A jar is only in the image, docker/Dockerfile)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from common.lake import Lake
from common.model import load_model
from common.registry import COVISITATION, ITEM_FACTORS, POPULARITY, RANKER, USER_FACTORS, Manifest, Registry
from common.settings import Settings, TrainingSettings, get_settings, load_settings
from spark_jobs import pipeline, tables
from spark_jobs.plan import make_plan
from tests.conftest import S3Bucket
from tests.speed_factories import publish_model

CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recs.generate import generate

    root = tmp_path_factory.mktemp("s3-shop") / "lake"
    generate("tiny", 7, Lake(str(root)), end_date=CUTOFF.date())
    return root


def on_s3(shop: Path, bucket: S3Bucket) -> str:
    """A copy of the local lake in the bucket; its URL."""
    lake = Lake(bucket.url("lake"))
    lake.fs.put(f"{shop}/", lake.root, recursive=True)
    return lake.root_url


def settings_for(lake_root: str, models_root: str, work: Path) -> Settings:
    base = load_settings(training=TrainingSettings(factors=16, iterations=8, max_requests=500))
    return base.model_copy(
        update={
            "var_dir": work,
            "lake": base.lake.model_copy(update={"root": lake_root}),
            "models": base.models.model_copy(update={"root": models_root}),
        }
    )


def assert_same(table: pa.Table, expected: pa.Table) -> None:
    """Equal rows, the sums up to the order DuckDB's threads added them in."""
    assert table.schema == expected.schema
    for name in table.column_names:
        if pa.types.is_floating(table.schema.field(name).type):
            np.testing.assert_allclose(table[name].to_numpy(), expected[name].to_numpy(), rtol=1e-9)
        else:
            assert table[name].equals(expected[name]), name


def test_the_batch_readers_read_the_lake_on_s3_as_on_disk(shop: Path, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    from spark_jobs.interactions import local_interactions
    from spark_jobs.replay import load_log

    local = settings_for(str(shop), str(tmp_path / "models"), tmp_path)
    remote = settings_for(on_s3(shop, s3_bucket), s3_bucket.url("models"), tmp_path)
    on_disk, on_s3_ = Lake(local.lake.root), Lake(remote.lake.root)
    assert pipeline.validate(remote, CUTOFF) == pipeline.validate(local, CUTOFF)
    expected = local_interactions(on_disk, CUTOFF, local.training)
    assert expected.num_rows > 0
    assert_same(local_interactions(on_s3_, CUTOFF, remote.training), expected)
    events = [lake.read_events(end=CUTOFF, columns=tables.SEQUENCE_COLUMNS) for lake in (on_disk, on_s3_)]
    assert_same(tables.popularity(events[1]), tables.popularity(events[0]))
    speed = local.speed
    covis = [tables.covisitation(e, speed.covis_top_n, speed.covis_steps, speed.recent_items) for e in events]
    assert covis[0].num_rows > 0
    assert_same(covis[1], covis[0])
    # The ranker's training set and the evaluation read the event log and the catalog from the lake.
    log, expected_log = (load_log(lake, CUTOFF, local.training) for lake in (on_s3_, on_disk))
    assert len(expected_log.session) > 0 and len(expected_log.item_ids) > 0
    assert log.item_ids == expected_log.item_ids
    for name in ("person", "session", "item", "event_type", "ts_s", "weight"):
        assert np.array_equal(getattr(log, name), getattr(expected_log, name)), name


@pytest.mark.slow
def test_the_implicit_engine_trains_a_version_from_and_into_s3(shop: Path, s3_bucket: S3Bucket, tmp_path: Path) -> None:
    settings = settings_for(on_s3(shop, s3_bucket), s3_bucket.url("models"), tmp_path)
    plan = make_plan(settings, CUTOFF, "implicit")
    pipeline.validate(settings, plan.cutoff)
    for step in (pipeline.build_interactions, pipeline.train_als, pipeline.train_ranker):
        step(plan, settings)
    registry = Registry(settings.models.root)
    written = {p.rsplit("/", 1)[-1] for p in registry.fs.find(registry.version_dir(plan.version))}
    assert {USER_FACTORS, ITEM_FACTORS, POPULARITY, COVISITATION, RANKER} <= written
    registry.write_manifest(Manifest(version=plan.version, created_at=CUTOFF, cutoff=CUTOFF, engine="implicit"))
    registry.verify(plan.version)  # the artifacts read back from S3 match the hashes taken there
    model = load_model(registry, plan.version)
    assert model.item_factors.shape[0] == len(model.item_ids) > 0


def test_the_warehouse_views_read_the_lake_and_registry_on_s3(
    shop: Path, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recs.main import app

    monkeypatch.setenv("RECS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RECS_LAKE__ROOT", on_s3(shop, s3_bucket))
    monkeypatch.setenv("RECS_MODELS__ROOT", s3_bucket.url("models"))
    get_settings.cache_clear()
    publish_model(Registry(s3_bucket.url("models")), "v1", CUTOFF, np.ones((3, 2), np.float32), ["u1"])
    try:
        query = "SELECT count(*) AS n, count(DISTINCT dt) AS days FROM lake_events"
        runner = CliRunner()
        assert runner.invoke(app, ["warehouse", "build"]).exit_code == 0
        done = runner.invoke(app, ["warehouse", "sql", "--json", query])
        assert done.exit_code == 0, done.output
        current = runner.invoke(app, ["warehouse", "sql", "--json", "SELECT version FROM registry_current"])
        assert current.exit_code == 0 and '"v1"' in current.output, current.output
    finally:
        get_settings.cache_clear()
    on_disk = Lake(str(shop)).read_events()
    days = len({t.date() for t in on_disk["received_at"].to_pylist()})
    assert json.loads(done.output) == [{"n": on_disk.num_rows, "days": days}]
