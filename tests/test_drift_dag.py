"""The drift_check DAG under `airflow dags test`: a shifted sample marks the version and triggers
nightly_retrain (a queued run in Airflow's DB, which no scheduler starts here)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import redis

from bench.serve import publish_synthetic_model
from common import drift, redis_keys
from common.features import FEATURE_NAMES
from common.lake import Lake
from common.redis_server import RedisServer
from common.registry import Registry
from common.settings import PROJECT_ROOT, Settings, get_settings, load_settings
from spark_jobs.airflow_run import airflow_binary, airflow_env, dags_test

pytestmark = pytest.mark.slow

REQUESTS = 150


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Settings]:
    var = tmp_path_factory.mktemp("drift-dag") / "var"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECS_VAR_DIR", str(var))
        mp.setenv("RECS_LAKE__ROOT", str(var / "lake"))
        mp.setenv("RECS_MODELS__ROOT", str(var / "models"))
        mp.setenv("RECS_REDIS__URL", redis_server.url)
        mp.setenv("AIRFLOW_HOME", str(var / "airflow"))
        get_settings.cache_clear()
        settings = load_settings()
        registry = Registry(settings.models.root)
        publish_synthetic_model(registry, Lake(settings.lake.root), with_ranker=False)
        drift.save_baseline(registry, "v1", pools(np.random.default_rng(1), categories=8))
        yield settings
    get_settings.cache_clear()


def pools(rng: np.random.Generator, categories: int) -> list[drift.PoolSample]:
    """Requests whose features and scores come from one fixed law; served items from `categories` categories."""
    return [
        drift.PoolSample(
            at_s=0.0, model_version="v1", context="home", cold_start=bool(rng.random() < 0.3),
            categories=[f"cat{c}" for c in rng.integers(0, categories, 10)],
            features=rng.normal(size=(32, len(FEATURE_NAMES))).astype(np.float32),
            scores=rng.normal(size=32).astype(np.float32),
        )  # fmt: skip
        for _ in range(REQUESTS)
    ]


def serve(client: redis.Redis, samples: list[drift.PoolSample]) -> None:
    client.delete(redis_keys.DRIFT_SAMPLE)
    for sample in samples:
        drift.log_served(client, sample, max_requests=1000)


def retrain_runs(settings: Settings) -> list[dict[str, str]]:
    done = subprocess.run(
        [airflow_binary(), "dags", "list-runs", "nightly_retrain", "-o", "json"],
        env=airflow_env(settings), capture_output=True, text=True, check=True,
    )  # fmt: skip
    runs: list[dict[str, str]] = json.loads(done.stdout.strip().splitlines()[-1])  # after Airflow's warnings
    return runs


def test_the_dag_imports_and_every_task_retries(env: Settings) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["drift_check"]
    assert [t.task_id for t in dag.topological_sort()] == ["check", "newly_drifted", "trigger_retrain"]
    assert dag.get_task("trigger_retrain").trigger_dag_id == "nightly_retrain"  # type: ignore[attr-defined]
    assert {a.name for a in dag.get_task("trigger_retrain").outlets} == {"lambdarec_model_drift"}
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id


def test_a_shifted_sample_marks_the_version_and_triggers_the_retrain(env: Settings, redis_client: redis.Redis) -> None:
    """One `dags test` (an Airflow run costs most of a minute on 2 cores): the check's verdicts on steady and
    shifted samples are tested in test_drift.py; here, that the DAG acts on a drift."""
    registry = Registry(env.models.root)
    serve(redis_client, pools(np.random.default_rng(3), categories=2))  # served items now from two categories
    assert registry.drift_marker("v1") is None
    shifted = dags_test(env, date(2026, 11, 3), capture=True, dag_id="drift_check")
    assert shifted.returncode == 0, (shifted.stdout + shifted.stderr)[-4000:]
    marker = registry.drift_marker("v1")
    assert marker is not None and marker.requests == REQUESTS
    assert any(r.startswith(drift.CATEGORIES) for r in marker.reasons), marker.reasons
    runs = retrain_runs(env)
    assert len(runs) == 1 and runs[0]["logical_date"].startswith("2026-11-03"), runs
    assert (Path(env.var_dir) / "reports" / "drift.html").exists()
