"""Both ALS engines on the same synthetic interactions: Spark equals DuckDB on the interactions, and the
Spark and implicit models pass the same model tests and reach Recall@20 within 10% of each other."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from common.lake import Lake
from common.model import load_model, save_factors
from common.registry import Manifest, Registry
from common.settings import SparkSettings, TrainingSettings
from spark_jobs.als import Factors, fit_implicit, fit_spark
from spark_jobs.evaluate import holdout_recall
from spark_jobs.interactions import local_interactions, spark_interactions, spark_to_arrow

pytestmark = pytest.mark.slow

END = datetime(2026, 11, 1, tzinfo=UTC)
SPLIT = END - timedelta(days=2)
TRAINING = TrainingSettings(factors=32, iterations=10)


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    from recs.generate import generate

    lake = Lake(str(tmp_path_factory.mktemp("engines") / "lake"))
    generate("small", 7, lake, end_date=END.date())
    return lake


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    from spark_jobs.spark import spark_session

    session = spark_session(SparkSettings(shuffle_partitions=2), master="local[2]", app_name="test-batch-engines")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def train_interactions(small_lake: Lake) -> pa.Table:
    return local_interactions(small_lake, SPLIT, TRAINING)


@pytest.fixture(scope="module")
def fitted(spark: Any, train_interactions: pa.Table) -> dict[str, Factors]:
    frame = spark.createDataFrame(train_interactions.to_pandas())
    return {"spark": fit_spark(spark, frame, TRAINING), "implicit": fit_implicit(train_interactions, TRAINING)}


def pairs(table: pa.Table) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for person, item in zip(table["person_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        out.setdefault(person, set()).add(item)
    return out


def test_spark_and_duckdb_interactions_are_equal(spark: Any, small_lake: Lake, train_interactions: pa.Table) -> None:
    from_spark = spark_to_arrow(spark_interactions(spark, small_lake, SPLIT, TRAINING))
    assert from_spark.num_rows == train_interactions.num_rows > 10_000
    assert from_spark["person_id"].equals(train_interactions["person_id"])
    assert from_spark["item_id"].equals(train_interactions["item_id"])
    np.testing.assert_allclose(from_spark["value"].to_numpy(), train_interactions["value"].to_numpy(), rtol=1e-12)
    assert from_spark["sessions"].equals(train_interactions["sessions"])
    assert max(train_interactions["sessions"].to_pylist()) > 1  # the count is of sessions, not always one
    np.testing.assert_allclose(from_spark["last_s"].to_numpy(), train_interactions["last_s"].to_numpy(), rtol=1e-15)


@pytest.mark.parametrize("engine", ["spark", "implicit"])
def test_engine_writes_loadable_artifacts(engine: str, fitted: dict[str, Factors], train_interactions: pa.Table, tmp_path: Path) -> None:
    factors = fitted[engine]
    assert factors.user_ids == sorted(set(train_interactions["person_id"].to_pylist()))
    assert factors.item_ids == sorted(set(train_interactions["item_id"].to_pylist()))
    assert factors.user_factors.shape == (len(factors.user_ids), TRAINING.factors)
    assert factors.item_factors.shape == (len(factors.item_ids), TRAINING.factors)
    assert np.isfinite(factors.user_factors).all() and np.isfinite(factors.item_factors).all()
    registry = Registry(str(tmp_path / "models"))
    save_factors(
        registry, "v1", factors.user_ids, factors.user_factors, factors.item_ids, factors.item_factors,
        top_items=TRAINING.top_items_kept,
    )
    registry.write_manifest(Manifest(version="v1", created_at=END, cutoff=SPLIT, engine=engine))
    model = load_model(registry, "v1")
    person = factors.user_ids[3]
    np.testing.assert_array_equal(model.user_vector(person), factors.user_factors[3])
    assert model.manifest.files.keys() >= {"user_factors.npy", "item_factors.npy", "user_ids.json", "item_ids.json"}


@pytest.mark.parametrize("engine", ["spark", "implicit"])
def test_engine_scores_a_persons_own_items_above_the_rest(engine: str, fitted: dict[str, Factors], train_interactions: pa.Table) -> None:
    factors = fitted[engine]
    item_row = {item: i for i, item in enumerate(factors.item_ids)}
    seen = pairs(train_interactions)
    wins = []
    for u, person in enumerate(factors.user_ids[:300]):
        scores = factors.item_factors @ factors.user_factors[u]
        mine = [item_row[i] for i in seen[person]]
        wins.append(scores[mine].mean() > np.median(scores))
    assert np.mean(wins) > 0.9


@pytest.mark.parametrize("engine", ["spark", "implicit"])
def test_engine_beats_chance_on_later_days(engine: str, fitted: dict[str, Factors], small_lake: Lake, train_interactions: pa.Table) -> None:
    factors = fitted[engine]
    later = pairs(local_interactions(small_lake, END, TRAINING))
    recall = holdout_recall(factors.user_ids, factors.user_factors, factors.item_ids, factors.item_factors, pairs(train_interactions), later)
    assert recall > 5 * 20 / len(factors.item_ids)


def test_engines_recall_within_ten_percent(fitted: dict[str, Factors], small_lake: Lake, train_interactions: pa.Table) -> None:
    later = pairs(local_interactions(small_lake, END, TRAINING))
    seen = pairs(train_interactions)
    recall = {
        engine: holdout_recall(f.user_ids, f.user_factors, f.item_ids, f.item_factors, seen, later) for engine, f in fitted.items()
    }
    assert abs(recall["spark"] - recall["implicit"]) <= 0.10 * max(recall.values()), recall


def test_both_engines_keep_only_personalisation_consent_and_read_files_from_before_the_column(
    spark: Any, tmp_path: Path
) -> None:
    from tests.test_batch_units import CUTOFF, consent_lake

    lake = Lake(str(tmp_path / "lake"))
    consent_lake(lake)
    from_duckdb = local_interactions(lake, CUTOFF, TRAINING)
    from_spark = spark_to_arrow(spark_interactions(spark, lake, CUTOFF, TRAINING))
    assert from_spark.equals(from_duckdb)
    assert set(from_spark["person_id"].to_pylist()) == {"dev-p", "dev-old"}
