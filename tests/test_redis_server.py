"""The embedded redis-server: start, status, stop on a free port, with data under its own directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from common import redis_keys
from common.redis_server import RedisServer, RedisServerError, embedded_server, free_port
from common.settings import RedisSettings


def test_start_status_stop_on_a_free_port(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    assert not server.is_running()
    server.start()
    try:
        assert server.is_running()
        assert server.pid_file.exists()
        client = server.client()
        client.set("k", "v")
        assert client.get("k") == b"v"
        server.start()  # a second start is a no-op on a running server
        assert server.is_running()
    finally:
        assert server.stop() is True
    assert not server.is_running()
    assert not server.pid_file.exists()
    assert server.stop() is False  # nothing left to stop


def test_kill_is_seen_as_down(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    server.start()
    server.kill()
    assert not server.is_running()
    server.stop()


def test_a_missing_binary_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="redis-server is not installed"):
        RedisServer(data_dir=tmp_path / "redis", port=free_port()).start()


def test_a_full_server_refuses_writes_and_evicts_nothing(tmp_path: Path) -> None:
    """At maxmemory nothing is evicted, TTL or not: not the stream, not the dedup markers and tombstones
    (which carry TTLs), not the session state. Writes are refused with OOM; acknowledging and deleting,
    which free memory, still work."""
    budget = 4 * 1024 * 1024
    server = RedisServer(
        data_dir=tmp_path / "redis", port=free_port(), persist=False, max_memory_bytes=budget
    )
    server.start()
    try:
        client = server.client()
        assert client.config_get("maxmemory") == {"maxmemory": str(budget)}
        stream = redis_keys.stream()
        client.xgroup_create(stream, "speed", id="0", mkstream=True)
        entries = [client.xadd(stream, {"e": "x" * 200}) for _ in range(100)]
        client.xreadgroup("speed", "c1", {stream: ">"}, count=10)
        client.zadd(redis_keys.seen_events("p1"), {"e1": 1.0})
        client.expire(redis_keys.seen_events("p1"), 7 * 86400)
        client.set(redis_keys.erased("gone"), 1, ex=30 * 86400)
        written = 0
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for n in range(100_000):  # session state with a short TTL, as a volatile-* policy evicts first
                client.set(redis_keys.session_counts(f"p{n}", "s"), "v" * 1000, ex=1800)
                written += 1
        assert written > 1000  # it was the budget that refused, not something else
        assert client.info("stats")["evicted_keys"] == 0
        assert client.dbsize() == written + 3
        assert client.xlen(stream) == len(entries)
        assert client.zscore(redis_keys.seen_events("p1"), "e1") == 1.0
        assert client.exists(redis_keys.erased("gone"))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.xadd(stream, {"e": "x"})  # the API answers 503, the client retries
        assert client.xack(stream, "speed", *entries[:10]) == 10
        assert client.delete(redis_keys.session_counts("p0", "s")) == 1
    finally:
        server.stop()


def test_the_embedded_server_takes_its_budget_from_settings(tmp_path: Path) -> None:
    server = embedded_server(RedisSettings(port=free_port(), data_dir=tmp_path, max_memory_mb=64))
    assert server.max_memory_bytes == 64 * 1024 * 1024


def test_a_cluster_url_names_its_seed_nodes_and_one_of_them_for_subscribers() -> None:
    from common.redis_server import cluster_nodes, is_cluster_url, pubsub_url

    url = "redis+cluster://app:s%40cret@10.0.0.1:7001,10.0.0.2:7002/0"
    assert is_cluster_url(url) and not is_cluster_url("redis://127.0.0.1:6379/0")
    assert cluster_nodes(url) == [("10.0.0.1", 7001), ("10.0.0.2", 7002)]
    assert pubsub_url(url) == "redis://app:s%40cret@10.0.0.1:7001/0"
    assert pubsub_url("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(ValueError, match="host:port"):
        cluster_nodes("redis+cluster://10.0.0.1")


def test_connect_gives_a_cluster_client_for_a_cluster_url(redis_cluster) -> None:
    from common.redis_server import connect, is_cluster

    client = connect(redis_cluster.url, timeout_s=5)
    assert is_cluster(client) and len(client.get_primaries()) == 3  # type: ignore[attr-defined]
    assert client.set("k", "v") and client.get("k") == b"v"


def test_a_stopped_local_cluster_starts_again_as_the_same_cluster(tmp_path: Path) -> None:
    """`recs cluster down` then `up --redis-cluster`: the nodes come back from their nodes.conf and find each
    other again, where a second `redis-cli --cluster create` would fail on nodes that are not empty."""
    from common.redis_server import LocalRedisCluster, connect, free_cluster_port

    cluster = LocalRedisCluster(tmp_path, tuple(free_cluster_port() for _ in range(3)), replicas=0)
    cluster.start()
    try:
        ids = {node.port: node.client().execute_command("CLUSTER", "MYID") for node in cluster.nodes}
        cluster.stop()
        assert not any(node.is_running() for node in cluster.nodes)
        assert cluster.is_formed() is False  # nothing answers
        cluster.start()
        assert cluster.is_ok()
        assert {node.port: node.client().execute_command("CLUSTER", "MYID") for node in cluster.nodes} == ids
        client = connect(cluster.url, timeout_s=5)
        assert client.set("k", "v") and client.get("k") == b"v"
        client.close()
    finally:
        cluster.stop()
