"""Chaos on a real Redis Cluster (3 masters, 3 replicas): while storefront clients send batches through the
API, kill -9 the speed consumer while it holds a batch, again and again, restarting it. Then every
counter the speed layer keeps equals the count over the unique events (test_chaos.py's check on one
Redis): on the split path too, nothing is lost and nothing is applied twice."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from common import redis_keys
from common.redis_server import LocalRedisCluster, free_port
from common.stream import group_lag
from tests.test_chaos import (
    Client,
    Role,
    _api_up,
    _assert_redis_counts_unique_events,
    _wait,
    chaos_env,
    chaos_settings,
    kill_consumer_mid_batch,
)

pytestmark = pytest.mark.slow

ROUNDS = 4


def test_a_consumer_killed_mid_batch_on_a_redis_cluster_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, redis_cluster: LocalRedisCluster, cluster_client: redis.Redis
) -> None:
    settings = chaos_settings(tmp_path, redis_cluster.url)
    env = chaos_env(tmp_path, settings, redis_cluster.url)
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    api = Role("api", ["serve", "--workers", "1", "--port", str(port)], env, logs)
    consumer = Role("speed", ["speed", "run"], env, logs)
    stream, group = redis_keys.stream(settings.redis.stream), settings.speed.group
    url = f"http://127.0.0.1:{port}"
    # No identify: the merge is refused on a cluster yet (README, Redis Cluster, "Not yet").
    clients = [
        Client(f"{url}/v1/events", [("u0", "d0"), (None, "d2")], seed=1, identify=None),
        Client(f"{url}/v1/events", [("u1", "d1"), (None, "d3")], seed=2, identify=None),
        Client(f"{url}/v1/events", [(None, "d4"), (None, "d5")], seed=3, identify=None),
    ]
    kills: Counter[str] = Counter()
    try:
        api.start()
        consumer.start()
        _wait(lambda: _api_up(f"{url}/healthz"), 60, "the API")
        for c in clients:
            c.start()
        for _ in range(ROUNDS):
            time.sleep(1.0)  # traffic for the consumer to work on
            hit = kill_consumer_mid_batch(consumer, cluster_client, stream, group)
            kills["consumer_mid_batch" if hit else "consumer_idle"] += 1
            consumer.start()
            assert all(c.error is None for c in clients), [c.error for c in clients]
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=120)
            assert c.error is None and not c.is_alive(), c.error
        _wait(
            lambda: group_lag(cluster_client, settings.redis.stream, group) == 0
            and cluster_client.xpending(stream, group)["pending"] == 0,
            120,
            "the speed layer to drain",
        )
    finally:
        for role in (api, consumer):
            role.stop()

    accepted = {e.event_id: e for c in clients for e in c.accepted}
    assert len(accepted) == sum(len(c.accepted) for c in clients) > 0
    print("chaos on a cluster:", json.dumps({**kills, "events": len(accepted), "consumer_starts": consumer.starts}))
    assert kills["consumer_mid_batch"] >= 1, kills  # the window was hit: effects in progress when killed
    assert cluster_client.xlen(stream) == len(accepted)  # the API was not killed: each event appended once
    assert cluster_client.xlen(redis_keys.dead_letter(settings.redis.stream)) == 0
    _assert_redis_counts_unique_events(cluster_client, list(accepted.values()), settings)
