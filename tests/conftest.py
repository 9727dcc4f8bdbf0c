"""Shared fixtures: a real redis-server on a free port, a temporary lake and registry."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import psutil
import pytest
import redis

from common.lake import Lake
from common.redis_server import LocalRedisCluster, RedisServer, connect, free_cluster_port, free_port
from common.registry import Registry
from tests.s3_support import MotoServer, s3_env

# The speed consumers and lake writers the tests start expose no metrics port unless a test gives one:
# the fixed default ports would clash between tests, and between test runs on one machine.
os.environ.setdefault("RECS_METRICS__SPEED_PORT", "0")
os.environ.setdefault("RECS_METRICS__LAKE_WRITER_PORT", "0")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the test session (the same code as `recs redis start`)."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"), port=free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on an emptied database."""
    if not redis_server.is_running():  # a test may have killed it on purpose
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real Redis Cluster for the test session: 3 masters and 3 replicas on free loopback ports (the
    same code as `recs cluster up --redis-cluster`), a short node timeout so a failover takes seconds."""
    cluster = LocalRedisCluster(
        tmp_path_factory.mktemp("redis-cluster"), tuple(free_cluster_port() for _ in range(6)), node_timeout_ms=1000
    )
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_client(redis_cluster: LocalRedisCluster) -> Iterator[redis.Redis]:
    """A cluster client on emptied masters (a test that killed a node leaves its replica promoted)."""
    redis_cluster.wait_ok()
    client = connect(redis_cluster.url, timeout_s=5)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(params=["single", "cluster"])
def any_redis(request: pytest.FixtureRequest) -> tuple[redis.Redis, str]:
    """An emptied single Redis, then an emptied Redis Cluster: (client, its RECS_REDIS__URL)."""
    if request.param == "single":
        return request.getfixturevalue("redis_client"), request.getfixturevalue("redis_server").url
    return request.getfixturevalue("cluster_client"), request.getfixturevalue("redis_cluster").url


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(str(tmp_path / "lake"))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(str(tmp_path / "models"))


@pytest.fixture
def recs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer) -> Path:
    """Point every setting at temporary places and the test Redis; returns the var dir."""
    from common.settings import get_settings

    var = tmp_path / "var"
    monkeypatch.setenv("RECS_VAR_DIR", str(var))
    monkeypatch.setenv("RECS_LAKE__ROOT", str(var / "lake"))
    monkeypatch.setenv("RECS_MODELS__ROOT", str(var / "models"))
    monkeypatch.setenv("RECS_REDIS__URL", redis_server.url)
    get_settings.cache_clear()
    yield var
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """One moto S3 server process for the test session (MinIO's stand-in)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class S3Bucket:
    name: str
    env: dict[str, str]  # what a deployment's process gets (compose): credentials and endpoint

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])


@pytest.fixture
def s3_bucket(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket, and this process configured for it the way compose configures a service."""
    env = s3_env(s3_server.endpoint)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # fsspec reads FSSPEC_S3_* once, at import; a deployed process starts with them set.
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    fsspec.config.set_conf_env(fsspec.config.conf)
    name = f"lake-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return S3Bucket(name, env)


def process_gone(pid: int) -> bool:
    """The process has exited: a zombie not yet reaped, or reaped already (even between two looks)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
