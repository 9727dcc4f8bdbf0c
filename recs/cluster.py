"""`recs cluster up|down|status`: every role of a deployment as processes on this machine, on loopback.

A Spark standalone master and workers (the `spark-class` that ships in the pyspark wheel), the
private Redis (or, with `--redis-cluster`, a Redis Cluster of 3 masters and 3 replicas from the same
redis-server binary, which every other process is then pointed at), the speed-layer consumers, the
lake writer and the API. Each process's pid file and
log live in var/cluster/; `down` signals only processes whose pid file `up` wrote, matched by start
time as well, so a recycled pid is never touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from common.redis_server import LocalRedisCluster, RedisServer, embedded_server
from common.settings import LOOPBACK, Settings, redacted

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
REDIS = "redis"
REDIS_CLUSTER = "redis-cluster"


class ClusterError(RuntimeError):
    pass


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    port: int | None = None  # the fixed port it listens on, checked free before it starts
    env: dict[str, str] = field(default_factory=dict)


def spark_class() -> Path:
    spec = importlib.util.find_spec("pyspark")
    if spec is None or spec.origin is None:
        raise ClusterError("pyspark is not installed in this environment (run `make setup`)")
    return Path(spec.origin).parent / "bin" / "spark-class"


def services(settings: Settings) -> list[Service]:
    """Every process of the cluster except Redis, in start order."""
    cluster, api = settings.cluster, settings.api
    recs = [sys.executable, "-m", "recs.main"]
    spark = [str(spark_class())]
    # SPARK_LOCAL_IP also binds the web UIs, which otherwise listen on every interface.
    spark_env = {"SPARK_LOCAL_IP": LOOPBACK}
    master = Service(
        "spark-master",
        [*spark, MASTER_CLASS, "--host", LOOPBACK, "--port", str(cluster.spark_port),
         "--webui-port", str(cluster.spark_ui_port)],
        port=cluster.spark_port,
        # Jobs come through spark-submit; the REST submission server would be one more open (unauthenticated) port.
        env={**spark_env, "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false"},
    )  # fmt: skip
    workers = []
    for i in range(1, cluster.spark_workers + 1):
        work_dir = cluster_dir(settings) / f"spark-worker-{i}"
        argv = [*spark, WORKER_CLASS, cluster.spark_master_url, "--host", LOOPBACK, "--cores", str(cluster.worker_cores),
                "--memory", cluster.worker_memory, "--webui-port", "0", "--work-dir", str(work_dir)]  # fmt: skip
        workers.append(Service(f"spark-worker-{i}", argv, env=spark_env))
    speed = [
        Service(f"speed-{i}", [*recs, "speed", "run"], env=_metrics_port("SPEED_PORT", settings.metrics.speed_port, i))
        for i in range(1, cluster.speed_consumers + 1)
    ]
    writer = Service("lake-writer", [*recs, "lake-writer", "run"])
    serve = [*recs, "serve", "--host", LOOPBACK, "--port", str(api.port), "--workers", str(api.workers)]
    return [master, *workers, *speed, writer, Service("api", serve, port=api.port)]


def _metrics_port(name: str, base: int, index: int) -> dict[str, str]:
    """Processes of one role each take their own metrics port: base, base + 1, ... (0 stays off)."""
    return {f"RECS_METRICS__{name}": str(base + index - 1 if base else 0)}


def cluster_dir(settings: Settings) -> Path:
    return settings.var_dir / "cluster"


def spark_ui_url(settings: Settings) -> str:
    return f"http://{LOOPBACK}:{settings.cluster.spark_ui_port}"


def api_url(settings: Settings) -> str:
    return f"http://{LOOPBACK}:{settings.api.port}"


def batch_settings(settings: Settings) -> dict[str, str]:
    """The variables that send the nightly DAG's Spark jobs to this cluster."""
    conf = {
        # Else the driver takes a non-loopback interface when the hostname resolves to 127.0.0.1.
        "spark.driver.host": LOOPBACK,
        # ALS checkpoints its lineage here; on one machine every executor sees this directory.
        "spark.checkpoint.dir": str(cluster_dir(settings) / "spark-checkpoints"),
    }
    return {
        "RECS_SPARK__MASTER": settings.cluster.spark_master_url,
        "RECS_TRAINING__ENGINE": "spark",
        "RECS_SPARK__CONF": json.dumps(conf),
    }


# ------------------------------------------------------------------ up, down, status


def up(settings: Settings, timeout_s: float = 120.0, redis_cluster: bool = False) -> list[str]:
    """Start whatever is not running yet and wait until it answers; returns the names started.
    `redis_cluster`: a local Redis Cluster instead of the private Redis (kept until `down`)."""
    if redis_cluster:
        cluster_dir(settings).mkdir(parents=True, exist_ok=True)
        _redis_cluster_record(settings).write_text(_redis_cluster(settings).url)  # first: `down` stops a failed start
        _redis_cluster(settings).start(timeout_s)
        started = [REDIS_CLUSTER]
    else:
        started = [REDIS] if _start_redis(settings) else []
    env = {
        **os.environ,
        "RECS_VAR_DIR": str(settings.var_dir),
        "RECS_LAKE__ROOT": settings.lake.root,
        "RECS_MODELS__ROOT": settings.models.root,
        "RECS_REDIS__URL": redis_url(settings),
    }
    cluster_dir(settings).mkdir(parents=True, exist_ok=True)
    for service in services(settings):
        if running(settings, service.name) is not None:
            continue
        if service.port is not None and _port_taken(service.port):
            raise ClusterError(
                f"port {service.port} for {service.name} is taken by a process `recs cluster` did not start"
            )
        _start(settings, service, {**env, **service.env})
        started.append(service.name)
    _wait_ready(settings, timeout_s)
    return started


def down(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Stop every process `up` started, Redis last (the speed consumers ack their last batch into it)."""
    leaders = {service.name: running(settings, service.name) for service in services(settings)}
    stopping = {name: process for name, process in leaders.items() if process is not None}
    _stop_groups(list(stopping.values()), timeout_s)  # all at once: none needs another one to stop
    for name in leaders:
        _record_path(settings, name).unlink(missing_ok=True)
    stopped = list(stopping)
    if running(settings, REDIS) is not None:
        _redis(settings).stop()
        stopped.append(REDIS)
    _record_path(settings, REDIS).unlink(missing_ok=True)
    if _redis_cluster_record(settings).exists():
        _redis_cluster(settings).stop()
        _redis_cluster_record(settings).unlink()
        stopped.append(REDIS_CLUSTER)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    """What is up, as JSON-ready data: each process, Redis, and the Spark master's own view."""
    processes = {}
    for service in services(settings):
        process = running(settings, service.name)
        processes[service.name] = {
            "up": process is not None,
            "pid": process.pid if process else None,
            "log": str(_log_path(settings, service.name)),
        }
    redis_up = _redis_answers(redis_url(settings))
    return {
        "all_up": redis_up and all(p["up"] for p in processes.values()),
        "processes": processes,
        "redis": {
            "url": redacted(redis_url(settings)),
            "up": redis_up,
            "started_by_cluster": running(settings, REDIS) is not None or _redis_cluster_record(settings).exists(),
        },
        "spark": {
            "master": settings.cluster.spark_master_url,
            "ui": spark_ui_url(settings),
            **_spark_summary(settings),
        },
        "api": api_url(settings),
        "batch_settings": batch_settings(settings),
    }


def master_json(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    """The Spark master's status page as data (workers, running and completed applications)."""
    response = httpx.get(f"{spark_ui_url(settings)}/json/", timeout=timeout_s)
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def running(settings: Settings, name: str) -> psutil.Process | None:
    """The process `up` started under this name, if it is still the same process and alive."""
    try:
        record = json.loads(_record_path(settings, name).read_text())
        process = psutil.Process(record["pid"])
        same = abs(process.create_time() - record["started"]) < 0.01
        alive = process.status() != psutil.STATUS_ZOMBIE
    except (FileNotFoundError, ValueError, KeyError, psutil.Error):
        return None
    return process if same and alive else None


# ------------------------------------------------------------------ processes


def _start(settings: Settings, service: Service, env: dict[str, str]) -> None:
    log = open(_log_path(settings, service.name), "ab")  # noqa: SIM115 - the child keeps it; ours closes below
    with log:
        # A session of its own: Ctrl-C in this terminal does not reach it, and `down` can signal its children.
        process = subprocess.Popen(
            service.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _write_record(_record_path(settings, service.name), psutil.Process(process.pid))


def _stop_groups(leaders: list[psutil.Process], timeout_s: float) -> None:
    """SIGTERM each process group (uvicorn workers, Spark executors with their leader), SIGKILL what
    outlives timeout_s."""
    members = [member for leader in leaders for member in (leader, *leader.children(recursive=True))]
    for leader in leaders:
        _signal_group(leader.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    if alive:
        for leader in leaders:
            _signal_group(leader.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # each service leads its own session, so its group id is its pid
    except ProcessLookupError:
        pass


def _write_record(path: Path, process: psutil.Process) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": process.pid, "started": process.create_time()}))


def _record_path(settings: Settings, name: str) -> Path:
    return cluster_dir(settings) / f"{name}.pid"


def _log_path(settings: Settings, name: str) -> Path:
    return cluster_dir(settings) / f"{name}.log"


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def _wait_ready(settings: Settings, timeout_s: float) -> None:
    """Until the master sees every worker and the API answers; fail early when a process has died."""
    deadline = time.monotonic() + timeout_s
    while True:
        dead = [s.name for s in services(settings) if running(settings, s.name) is None]
        if dead:
            logs = ", ".join(str(_log_path(settings, name)) for name in dead)
            raise ClusterError(f"{', '.join(dead)} exited; see {logs}")
        if _spark_summary(settings).get("alive_workers") == settings.cluster.spark_workers and _api_answers(
            settings
        ):
            return
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the cluster was not ready within {timeout_s:.0f} s; see the logs in {cluster_dir(settings)}"
            )
        time.sleep(0.5)


# ------------------------------------------------------------------ probes


def _start_redis(settings: Settings) -> bool:
    """Start the private Redis unless it answers already or RECS_REDIS__URL points elsewhere."""
    if settings.redis.url:
        return False
    server = _redis(settings)
    if server.is_running():
        return False  # an earlier `up` recorded it, or someone else runs it (then `down` leaves it)
    server.start()
    _write_record(_record_path(settings, REDIS), psutil.Process(int(server.pid_file.read_text())))
    return True


def _redis(settings: Settings) -> RedisServer:
    if settings.redis.port == 0:
        raise ClusterError("RECS_REDIS__PORT=0 picks a new port each time; the cluster needs a fixed one")
    return embedded_server(settings.redis)


def redis_url(settings: Settings) -> str:
    """The Redis the deployment uses: the Redis Cluster `up --redis-cluster` started, else the settings'."""
    record = _redis_cluster_record(settings)
    return record.read_text().strip() if record.exists() else settings.redis.effective_url


def _redis_cluster(settings: Settings) -> LocalRedisCluster:
    base = settings.cluster.redis_cluster_port
    return LocalRedisCluster(cluster_dir(settings) / "redis-cluster", tuple(range(base, base + 6)))


def _redis_cluster_record(settings: Settings) -> Path:
    """Written by `up --redis-cluster`: the cluster's URL, while it runs."""
    return cluster_dir(settings) / "redis-cluster.url"


def _redis_answers(url: str) -> bool:
    from common.redis_server import connect

    try:
        return bool(connect(url, timeout_s=0.5).ping())
    except Exception:  # any connection failure means "down" here
        return False


def _spark_summary(settings: Settings) -> dict[str, Any]:
    try:
        data = master_json(settings, timeout_s=1.0)
    except (httpx.HTTPError, ValueError):
        return {"up": False}
    return {
        "up": data.get("status") == "ALIVE",
        "alive_workers": data.get("aliveworkers", 0),
        "cores": data.get("cores", 0),
        "active_apps": [app["name"] for app in data.get("activeapps", [])],
        "completed_apps": len(data.get("completedapps", [])),
    }


def _api_answers(settings: Settings) -> bool:
    try:
        return httpx.get(f"{api_url(settings)}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False
