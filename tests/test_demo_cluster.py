"""`recs cluster up --redis-cluster`, then the demo's live part against it (`recs demo --cluster`): the live
day POSTed to the cluster's API, applied by its speed consumer on the Redis Cluster, read back as
recommendations that follow the session; then `recs cluster down` stops all of it."""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from common import redis_keys
from common.lake import Lake
from common.redis_server import connect, free_port, is_cluster
from common.registry import Registry
from common.settings import Settings
from common.stream import group_lag
from tests.test_cluster import recs, settings_with

pytestmark = [pytest.mark.cluster, pytest.mark.slow]



def free_port_run(n: int) -> int:
    """The first of n consecutive free ports whose cluster bus ports (10000 above) are free too; below
    Linux's ephemeral range (32768 up), so no outgoing connection takes one before the nodes start."""
    rng = random.Random()
    while True:
        base = rng.randrange(20_000, 22_000)
        try:
            for port in (*range(base, base + n), *range(base + 10000, base + 10000 + n)):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One of each role, on free ports; the lake writer flushes within the demo's wait."""
    return {
        "RECS_VAR_DIR": str(tmp_path_factory.mktemp("demo-cluster") / "var"),
        "RECS_CLUSTER__SPARK_PORT": str(free_port()),
        "RECS_CLUSTER__SPARK_UI_PORT": str(free_port()),
        "RECS_CLUSTER__SPARK_WORKERS": "1",
        "RECS_CLUSTER__SPEED_CONSUMERS": "1",
        "RECS_CLUSTER__REDIS_CLUSTER_PORT": str(free_port_run(6)),
        "RECS_REDIS__PORT": str(free_port()),
        "RECS_API__PORT": str(free_port()),
        "RECS_API__WORKERS": "1",
        "RECS_LAKE__FLUSH_SECONDS": "2",
        "COLUMNS": "120",
    }


def prepare(settings: Settings) -> str:
    """What the demo's first run leaves before its live part: the lake up to the live day and a current
    model with that cutoff (trained by the DAG's steps in-process, which the demo then reuses)."""
    from evaluation.replay import train
    from recs.demo import prepare_source, split_history

    live_day, _, _ = split_history(prepare_source(settings, "synthetic", "tiny", 42, None), Lake(settings.lake.root))
    return train(settings, datetime.combine(live_day, datetime.min.time(), tzinfo=UTC), "implicit")


@pytest.fixture(scope="module")
def on_cluster(env: dict[str, str]) -> Iterator[tuple[Settings, str]]:
    """The lake and model ready, then `recs cluster up --redis-cluster`; `down` at the end."""
    settings = settings_with(env)
    prepare(settings)
    started = recs(env, "cluster", "up", "--redis-cluster")
    try:
        assert started.returncode == 0, started.stderr[-3000:] + started.stdout[-3000:]
        status = json.loads(started.stdout)
        assert status["all_up"] and status["redis"]["url"].startswith("redis+cluster://"), status
        yield settings, status["redis"]["url"]
    finally:
        stopped = recs(env, "cluster", "down")
        assert stopped.returncode == 0 and "redis-cluster" in stopped.stdout, stopped.stderr + stopped.stdout


def demo_json(stdout: str) -> dict[str, Any]:
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    result: dict[str, Any] = json.loads("\n".join(lines[start:]))
    return result


def test_the_demos_live_part_runs_against_the_redis_cluster(
    on_cluster: tuple[Settings, str], env: dict[str, str]
) -> None:
    settings, url = on_cluster
    done = recs(env, "demo", "--size", "tiny", "--cluster", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reusing model" in done.stdout and "using `recs cluster`" in done.stdout
    result = demo_json(done.stdout)
    assert result["model_version"] == Registry(settings.models.root).current()
    assert result["live_events_sent"] > 100 and result["live_events_accepted"] == result["live_events_sent"]
    assert result["degraded"] is None
    assert result["changed"] and result["browsed_category"] in result["after_categories"]
    assert result["freshness_ms"] is not None

    # The cluster's consumer applied every live event, identifies included: nothing waits, nothing was
    # set aside; the person's state lives on the cluster.
    client = connect(url, timeout_s=5)
    assert is_cluster(client)
    stream = redis_keys.stream(settings.redis.stream)
    assert group_lag(client, settings.redis.stream, settings.speed.group) == 0
    assert client.xpending(stream, settings.speed.group)["pending"] == 0
    dead: Any = client.xrange(redis_keys.dead_letter(settings.redis.stream))  # redis-py types every reply shape
    assert [fields[b"reason"] for _, fields in dead] == []
    assert client.exists(redis_keys.person_items(result["person_id"]))
    client.close()


def test_a_demo_against_processes_older_than_its_catalog_is_refused(
    on_cluster: tuple[Settings, str], env: dict[str, str]
) -> None:
    """The API and the speed layer load the catalog when they start: started before the demo wrote it,
    they would serve without it, so the demo says to restart them instead."""
    settings, _ = on_cluster
    lake = Lake(settings.lake.root)
    lake.write_catalog(lake.read_catalog())  # a newer snapshot than the processes loaded
    done = recs(env, "demo", "--size", "tiny", "--cluster")
    assert done.returncode != 0
    assert "started before the demo wrote the lake's catalog" in done.stdout + done.stderr
