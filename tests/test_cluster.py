"""`recs cluster up|down|status` end to end: the nightly ALS task on a 2-worker Spark standalone master
(executors on both workers, Recall@20 within 5% of local mode), and two speed-layer processes sharing
one stream, every event applied exactly once, a stopped one's pending entries taken over by the other."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psutil
import pytest
import redis

from common import redis_keys
from common.events import EventType
from common.lake import Lake
from common.model import load_model
from common.redis_server import connect, free_port
from common.registry import Manifest, Registry
from common.settings import Settings, load_settings
from common.speed_state import read_speed_state
from common.stream import group_lag
from recs.cluster import batch_settings, master_json
from spark_jobs.evaluate import holdout_recall
from spark_jobs.interactions import local_interactions
from spark_jobs.pipeline import train_als
from spark_jobs.plan import STAGES, Plan, make_plan
from tests.speed_factories import add_events, make_event

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
END = datetime(2026, 11, 1, tzinfo=UTC)
CUTOFF = END - timedelta(days=2)
SESSIONS = 200
C1_ONLY = "-XX:TieredStopAtLevel=1"
HELD = 50  # entries the stopped consumer must hold unacknowledged


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings of the cluster under test: its own var dir and free ports; claims after 0.5 s idle."""
    return {
        "RECS_VAR_DIR": str(tmp_path_factory.mktemp("cluster") / "var"),
        "RECS_CLUSTER__SPARK_PORT": str(free_port()),
        "RECS_CLUSTER__SPARK_UI_PORT": str(free_port()),
        "RECS_REDIS__PORT": str(free_port()),
        "RECS_API__PORT": str(free_port()),
        "RECS_SPEED__CLAIM_IDLE_MS": "500",
        "RECS_SPEED__CLAIM_INTERVAL_S": "0.1",
        # Smaller than the defaults only to save time: the JVMs' warm-up dominates at this size anyway.
        "RECS_TRAINING__FACTORS": "16",
        "RECS_TRAINING__ITERATIONS": "5",
    }


def settings_with(env: dict[str, str]) -> Settings:
    """Settings exactly as a process started with these variables reads them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECS_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return load_settings()


def recs(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recs.main", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def cluster_status(env: dict[str, str]) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(recs(env, "cluster", "status").stdout)
    return status


@pytest.fixture(scope="module")
def cluster(cluster_env: dict[str, str]) -> Iterator[Settings]:
    from recs.generate import generate

    settings = settings_with(cluster_env)
    generate("tiny", 7, Lake(settings.lake.root), end_date=END.date())
    started = recs(cluster_env, "cluster", "up")
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield settings
    finally:
        stopped = recs(cluster_env, "cluster", "down")
        assert stopped.returncode == 0, stopped.stderr


def test_up_starts_every_role_once_on_loopback(cluster: Settings, cluster_env: dict[str, str]) -> None:
    status = cluster_status(cluster_env)
    assert status["all_up"], status
    assert set(status["processes"]) == {
        "spark-master", "spark-worker-1", "spark-worker-2", "speed-1", "speed-2", "lake-writer", "api",
    }  # fmt: skip
    assert status["spark"]["alive_workers"] == 2 and status["spark"]["cores"] == 2
    assert httpx.get(f"{status['api']}/healthz", timeout=5).status_code == 200
    api = psutil.Process(status["processes"]["api"]["pid"])
    assert len(api.children()) >= 2  # uvicorn's workers

    again = recs(cluster_env, "cluster", "up")
    assert again.returncode == 0 and "started: nothing" in again.stderr
    assert {n: p["pid"] for n, p in cluster_status(cluster_env)["processes"].items()} == {
        n: p["pid"] for n, p in status["processes"].items()
    }

    listening = set()
    for info in status["processes"].values():
        process = psutil.Process(info["pid"])
        for member in [process, *process.children(recursive=True)]:
            listening |= {
                c.laddr.ip for c in member.net_connections("inet") if c.status == psutil.CONN_LISTEN
            }
    assert listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


# ------------------------------------------------------------------ Spark


def write_interactions(plan: Plan, settings: Settings) -> None:
    """The interactions task's output, made by DuckDB (tested equal to Spark's in test_batch_engines)."""
    import pyarrow.parquet as pq

    for stage in STAGES:
        target = plan.interactions_dir(stage)
        target.mkdir(parents=True, exist_ok=True)
        table = local_interactions(Lake(settings.lake.root), plan.stage_cutoff(stage), settings.training)
        pq.write_table(table, target / "part-0.parquet")


def fitted_recall(plan: Plan, settings: Settings) -> float:
    """Recall@20 of the version's ALS factors on the days after its cutoff (as `recs bench train`)."""

    def pairs(cutoff: datetime) -> dict[str, set[str]]:
        table = local_interactions(Lake(settings.lake.root), cutoff, settings.training)
        out: dict[str, set[str]] = {}
        for person, item in zip(table["person_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
            out.setdefault(person, set()).add(item)
        return out

    registry = Registry(settings.models.root)
    registry.write_manifest(
        Manifest(version=plan.version, created_at=END, cutoff=plan.cutoff, engine="spark")
    )
    model = load_model(registry, plan.version)
    return holdout_recall(
        model.user_ids, model.user_factors, model.item_ids, model.item_factors, pairs(plan.cutoff), pairs(END)
    )


def tasks_per_executor(event_log_dir: Path) -> tuple[str, Counter[str]]:
    """The application id and the number of finished tasks per executor id, from Spark's event log."""
    (log,) = [p for p in event_log_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    app_id, tasks = "", Counter[str]()
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["Event"] == "SparkListenerApplicationStart":
            app_id = event["App ID"]
        elif event["Event"] == "SparkListenerTaskEnd":
            tasks[event["Task Info"]["Executor ID"]] += 1
    return app_id, tasks


def executors_per_worker(master: dict[str, Any], app_id: str) -> dict[str, set[str]]:
    """worker id -> the executor ids the app had there, from each worker's own /json/ page."""
    out = {}
    for worker in master["workers"]:
        page = httpx.get(f"{worker['webuiaddress']}/json/", timeout=5).json()
        executors = page["executors"] + page["finishedexecutors"]
        out[worker["id"]] = {str(e["id"]) for e in executors if e["appid"] == app_id}
    return out


def test_nightly_als_runs_on_both_workers_and_matches_local_mode(
    cluster: Settings, cluster_env: dict[str, str], tmp_path: Path
) -> None:
    event_log = tmp_path / "spark-events"
    event_log.mkdir()
    conf = {
        **json.loads(batch_settings(cluster)["RECS_SPARK__CONF"]),  # what `recs cluster up` prints
        # Wait for both executors before the first task, so the first one up cannot take every task.
        "spark.cores.max": "2",
        "spark.scheduler.minRegisteredResourcesRatio": "1.0",
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": event_log.as_uri(),
        "spark.eventLog.compress": "false",
        "spark.eventLog.rolling.enabled": "false",
        # Short-lived JVMs on tiny data: C2 compilation would only burn CPU (about a third of the run).
        "spark.driver.extraJavaOptions": C1_ONLY,
        "spark.executor.extraJavaOptions": C1_ONLY,
    }
    on_cluster = settings_with(
        {
            **cluster_env,
            **batch_settings(cluster),
            "RECS_SPARK__CONF": json.dumps(conf),
        }
    )
    plan = make_plan(on_cluster, CUTOFF)
    write_interactions(plan, on_cluster)
    train_als(plan, on_cluster)  # the DAG's ALS task: spark-submit --master spark://127.0.0.1:<port>

    master = master_json(cluster)
    assert [w["state"] for w in master["workers"]] == ["ALIVE", "ALIVE"]
    (app,) = [a for a in master["completedapps"] if a["name"] == "lambdarec-als"]
    assert app["state"] == "FINISHED" and app["cores"] == 2
    app_id, tasks = tasks_per_executor(event_log)
    assert app_id == app["id"]
    per_worker = executors_per_worker(master, app_id)
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    ran = {worker: sum(tasks[e] for e in executors) for worker, executors in per_worker.items()}
    assert all(n > 0 for n in ran.values()), (ran, tasks)

    local = settings_with(
        {
            **cluster_env,
            "RECS_VAR_DIR": str(tmp_path / "local"),
            "RECS_LAKE__ROOT": cluster.lake.root,
            "RECS_SPARK__MASTER": "local[2]",
            "RECS_TRAINING__ENGINE": "spark",
            "RECS_SPARK__CONF": json.dumps({"spark.driver.extraJavaOptions": C1_ONLY}),
        }
    )
    local_plan = make_plan(local, CUTOFF)
    shutil.copytree(plan.work_dir / "interactions", local_plan.work_dir / "interactions")
    train_als(local_plan, local)

    recall = {"cluster": fitted_recall(plan, on_cluster), "local": fitted_recall(local_plan, local)}
    items = len(load_model(Registry(on_cluster.models.root), plan.version).item_ids)
    assert recall["local"] > 2 * 20 / items, recall  # a real model, not chance
    assert abs(recall["cluster"] - recall["local"]) <= 0.05 * recall["local"], recall


# ------------------------------------------------------------------ speed layer


def send(client: redis.Redis, settings: Settings, first: int, n: int) -> None:
    """Events first..first+n-1, event i a view in session i % SESSIONS."""
    events = [
        make_event(
            EventType.VIEW, f"i{i % 37}", anonymous_id=f"a{i % SESSIONS}", session_id=f"s{i % SESSIONS}"
        )
        for i in range(first, first + n)
    ]
    add_events(client, settings, events)


def wait_drained(client: redis.Redis, settings: Settings, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while group_lag(client, settings.redis.stream, settings.speed.group) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_lag(client, settings.redis.stream, settings.speed.group) == 0


def pending_of(client: redis.Redis, settings: Settings, consumer: str) -> int:
    summary = client.xpending(redis_keys.stream(settings.redis.stream), settings.speed.group)
    return sum(c["pending"] for c in summary["consumers"] if c["name"].decode() == consumer)


def stop_holding_entries(client: redis.Redis, settings: Settings, pid: int, consumer: str, sent: int) -> int:
    """Send bursts until the consumer is frozen (SIGSTOP) in the middle of a batch of at least
    HELD entries, then kill it there. Returns how many events were sent."""
    for _ in range(100):
        send(client, settings, sent, 2 * SESSIONS)
        sent += 2 * SESSIONS
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if pending_of(client, settings, consumer) >= HELD:
                os.kill(pid, signal.SIGSTOP)
                if (
                    pending_of(client, settings, consumer) >= HELD
                ):  # still unacknowledged, now that it cannot ack
                    os.kill(pid, signal.SIGKILL)
                    psutil.Process(pid).wait(10)
                    return sent
                os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"{consumer} was never caught holding {HELD} entries")


def test_two_consumers_apply_each_event_once_and_take_over_a_stopped_ones_entries(
    cluster: Settings, cluster_env: dict[str, str]
) -> None:
    client = connect(cluster.redis.effective_url, timeout_s=5)
    status = cluster_status(cluster_env)
    pids = {name: status["processes"][name]["pid"] for name in ("speed-1", "speed-2")}
    names = {
        name: f"{socket.gethostname()}-{pid}-0" for name, pid in pids.items()
    }  # speed_layer.cli's naming

    sent = 0
    for _ in range(20):  # small batches while both read, so both get some
        send(client, cluster, sent, 50)
        sent += 50
        time.sleep(0.02)
    wait_drained(client, cluster)
    assert set(names.values()) <= {k.decode() for k in client.hgetall(redis_keys.SPEED_HEARTBEAT)}

    sent = stop_holding_entries(client, cluster, pids["speed-1"], names["speed-1"], sent)
    send(client, cluster, sent, 1000)
    sent += 1000
    wait_drained(client, cluster)  # only speed-2 is left: it must claim speed-1's entries
    assert pending_of(client, cluster, names["speed-1"]) == 0

    assert sent % SESSIONS == 0  # so every session got the same number of events
    counts: Counter[int] = Counter()
    for k in range(SESSIONS):
        counts[read_speed_state(client, f"a{k}", session_id=f"s{k}").session_counts.get("view", 0)] += 1
    assert counts == {sent // SESSIONS: SESSIONS}  # every event applied once: none lost, none twice
    assert client.xlen(redis_keys.dead_letter(cluster.redis.stream)) == 0

    after = cluster_status(cluster_env)["processes"]
    assert not after["speed-1"]["up"] and after["speed-2"]["up"]
    restarted = recs(cluster_env, "cluster", "up")
    assert restarted.returncode == 0 and "started: speed-1" in restarted.stderr, restarted.stderr
