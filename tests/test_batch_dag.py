"""The real nightly_retrain DAG under `airflow dags test` on small synthetic data (Spark engine via
spark-submit), then the gate, rollback and a corrupt lake around the version it published."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from typer.testing import CliRunner

from common.lake import EVENTS_DATASET, Lake
from common.messages import ModelEvent
from common.redis_keys import MODELS_CHANNEL
from common.redis_server import RedisServer
from common.registry import ARTIFACT_FILES, Registry
from common.settings import PROJECT_ROOT, Settings, get_settings, load_settings
from spark_jobs.airflow_run import dags_test
from spark_jobs.gate import REPLAY_CURRENT, REPLAY_FULL, REPLAY_OWN, REPLAY_VS_OWN

pytestmark = pytest.mark.slow

DAY = date(2026, 11, 1)
CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)
VERSION = "20261101T000000Z-spark"


@dataclass
class Env:
    var: Path
    settings: Settings
    registry: Registry
    redis: redis.Redis
    subscriber: Any

    def model_events(self) -> list[ModelEvent]:
        events = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            message = self.subscriber.get_message(timeout=0.2)
            if message and message["type"] == "message":
                events.append(ModelEvent.model_validate_json(message["data"]))
            elif message is None and events:
                break
        return events


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Env]:
    from recs.generate import generate

    var = tmp_path_factory.mktemp("batch-dag") / "var"
    generate("small", 3, Lake(str(var / "lake")), end_date=DAY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECS_VAR_DIR", str(var))
        mp.setenv("RECS_LAKE__ROOT", str(var / "lake"))
        mp.setenv("RECS_MODELS__ROOT", str(var / "models"))
        mp.setenv("RECS_REDIS__URL", redis_server.url)
        mp.setenv("RECS_TRAINING__ENGINE", "spark")
        mp.setenv("AIRFLOW_HOME", str(var / "airflow"))  # importing Airflow here must not touch ~/airflow
        mp.setenv("RECS_SPARK__MASTER", "local[2]")
        mp.setenv("RECS_TRAINING__FACTORS", "32")  # CI has 2 cores: a smaller model keeps the run short
        mp.setenv("RECS_TRAINING__ITERATIONS", "10")
        get_settings.cache_clear()
        settings = load_settings()
        client = redis_server.client()
        subscriber = client.pubsub(ignore_subscribe_messages=True)
        subscriber.subscribe(MODELS_CHANNEL)
        yield Env(var, settings, Registry(settings.models.root), client, subscriber)
        subscriber.close()
        client.close()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def first_run(env: Env) -> dict[str, Any]:
    clock = time.perf_counter()
    done = dags_test(env.settings, DAY, capture=True)
    wall_s = time.perf_counter() - clock
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    print(f"\nnightly_retrain on small (spark engine): {wall_s:.0f}s")
    return {"wall_s": wall_s, "events": env.model_events()}


def snapshot(registry: Registry) -> dict[str, bytes]:
    root = Path(registry.root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dagbag_imports_and_every_task_retries(env: Env) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags.get("nightly_retrain")  # get_dag() would consult the metadata DB
    assert dag is not None and dag.catchup is False and "batch" in dag.tags
    assert [t.task_id for t in dag.topological_sort()] == [
        "validate", "apply_erasures", "interactions", "train_als", "train_content_map",
        "train_ranker",
        "evaluate", "replay_gate", "gate_publish", "refresh_warehouse", "notify",
    ]  # fmt: skip
    for task in dag.tasks:
        assert task.retries >= 1 and task.retry_exponential_backoff, task.task_id


def test_erasure_runs_whatever_validation_found_and_training_needs_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))  # if Airflow is first imported here
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import TriggerRule

    dag = DagBag(dag_folder=str(PROJECT_ROOT / "dags")).dags["nightly_retrain"]
    erase = dag.get_task("apply_erasures")
    assert erase.upstream_task_ids == {"validate"} and erase.trigger_rule == TriggerRule.ALL_DONE
    interactions = dag.get_task("interactions")
    assert interactions.upstream_task_ids == {"validate", "apply_erasures"}
    assert interactions.trigger_rule == TriggerRule.ALL_SUCCESS


def test_dag_run_publishes_a_complete_version(env: Env, first_run: dict[str, Any]) -> None:
    assert env.registry.current() == VERSION
    manifest = env.registry.read_manifest(VERSION)
    assert manifest.status == "published" and manifest.cutoff == CUTOFF and manifest.engine == "spark"
    assert manifest.parameters["training"]["factors"] == env.settings.training.factors
    assert manifest.parameters["windows"]["evaluation"] == "2026-10-31T00:00..2026-11-01T00:00"
    assert set(manifest.files) == set(ARTIFACT_FILES)
    env.registry.verify(VERSION)
    for strategy in ("popular", "als", "heuristic", "als_ranker"):
        assert set(manifest.metrics[strategy]) >= {"recall_at_20", "ndcg_at_20", "mrr_at_20", "coverage"}
    assert set(manifest.metrics["paired_vs_heuristic"]) == {"mean", "low", "high", "sessions", "hr_mean", "hr_low", "hr_high"}
    assert manifest.counts["eval_requests"] > 100
    # The gate's replay of the window through Redis, the speed layer and serving: the dev model's full
    # and batch+speed lists on the same targets, paired; no serving version yet to replay beside it.
    full, own = manifest.metrics[REPLAY_FULL], manifest.metrics[REPLAY_OWN]
    assert full["predictions"] == own["predictions"] == manifest.counts["replay_targets"] > 100
    assert full["mean_list_length"] == own["mean_list_length"] == 20 and full["degraded"] == own["degraded"] == 0
    assert set(manifest.metrics[REPLAY_VS_OWN]) == {"mean", "low", "high", "sessions", "hr_mean", "hr_low", "hr_high"}
    assert REPLAY_CURRENT not in manifest.metrics and manifest.parameters["gate_replay"]["current"] is None
    assert manifest.decision is not None and manifest.decision.startswith("published: first version; replay full")
    assert (env.var / "warehouse.duckdb").exists() or any(env.var.glob("*.duckdb"))


def test_ranker_beats_its_pool_beats_als_beats_popularity_on_planted_tastes(env: Env, first_run: dict[str, Any]) -> None:
    metrics = env.registry.read_manifest(VERSION).metrics
    mrr = {strategy: metrics[strategy]["mrr_at_20"] for strategy in ("popular", "als", "heuristic", "als_ranker")}
    assert mrr["als_ranker"] > mrr["heuristic"] > mrr["als"] > mrr["popular"], mrr
    assert metrics["paired_vs_heuristic"]["low"] > 0  # better than its own pool beyond noise
    assert env.registry.read_manifest(VERSION).ranker_unused is None  # so serving ranks with it


def test_serving_is_told_on_redis(first_run: dict[str, Any]) -> None:
    assert [(e.kind, e.version, e.cutoff) for e in first_run["events"]] == [("published", VERSION, CUTOFF)]


def test_second_run_for_the_same_date_changes_nothing(env: Env, first_run: dict[str, Any]) -> None:
    before = snapshot(env.registry)
    done = dags_test(env.settings, DAY, capture=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert snapshot(env.registry) == before


@pytest.fixture(scope="module")
def worse_version(env: Env, first_run: dict[str, Any]) -> dict[str, Any]:
    """A deliberately worse model: 2 factors, 1 iteration, a ranker fitted on 20 sessions."""
    from recs.nightly import run_all
    from spark_jobs.plan import make_plan

    training = env.settings.training.model_copy(update={"factors": 2, "iterations": 1, "max_requests": 20})
    settings = env.settings.model_copy(update={"training": training})
    plan = make_plan(settings, datetime(2026, 10, 31, tzinfo=UTC), "implicit")
    return run_all(settings, plan, notify_redis=False)


def test_gate_rejects_a_deliberately_worse_model(env: Env, worse_version: dict[str, Any]) -> None:
    gate = worse_version["gate"]
    manifest = env.registry.read_manifest(gate["version"])
    assert gate["published"] is False and manifest.status == "rejected"
    # Refused either as worse than the serving version or as full lists worse than its own batch+speed.
    assert manifest.decision is not None and manifest.decision.startswith("rejected: ")
    assert VERSION in manifest.decision or "worse than its own batch+speed" in manifest.decision
    assert env.registry.current() == VERSION
    # The serving version's cutoff (Nov 1) is after this run's window (Oct 30): it was trained on it, so
    # it is not replayed there, and the manifest says so.
    assert REPLAY_CURRENT not in manifest.metrics and REPLAY_FULL in manifest.metrics
    assert manifest.parameters["gate_replay"]["current"] is None
    assert "trained on the window" in manifest.parameters["gate_replay"]["note"]


def test_activate_and_rollback_switch_current_and_announce(env: Env, worse_version: dict[str, Any]) -> None:
    from spark_jobs.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    other = worse_version["gate"]["version"]
    env.model_events()  # drain
    result = runner.invoke(app, ["model", "activate", other])
    assert result.exit_code == 0, result.output
    assert env.registry.current() == other
    result = runner.invoke(app, ["model", "rollback"])
    assert result.exit_code == 0, result.output
    assert env.registry.current() == VERSION
    assert [(e.kind, e.version) for e in env.model_events()] == [("activated", other), ("rolled_back", VERSION)]
    listing = runner.invoke(app, ["model", "list"]).output
    assert f"* {VERSION}" in listing and "rejected" in listing
    replayed = env.registry.read_manifest(VERSION).metrics[REPLAY_FULL]["mrr_at_20"]
    assert f"replay full {replayed:.4f}" in listing


def test_corrupt_partition_fails_the_run_and_publishes_nothing(env: Env, tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    shutil.copytree(env.settings.lake.root, lake.root)
    day = date(2026, 10, 20)
    victim = lake.partition_files(EVENTS_DATASET, day)[0]
    Path(victim).write_bytes(b"PAR1 not really parquet")
    settings = env.settings.model_copy(
        update={"lake": env.settings.lake.model_copy(update={"root": lake.root}),
                "models": env.settings.models.model_copy(update={"root": str(tmp_path / "models")})}
    )  # fmt: skip
    done = dags_test(settings, DAY, capture=True)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"events/dt={day}: file {Path(victim).name} is corrupt" in output
    assert Registry(str(tmp_path / "models")).versions() == [] and Registry(str(tmp_path / "models")).current() is None
