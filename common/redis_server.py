"""The embedded Redis: a private `redis-server` on a local port with its data under var/redis.

`recs redis start|stop|status` and the pytest fixture both use `RedisServer`, so tests run
against exactly what the demo runs. When RECS_REDIS__URL is set, nothing is started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import hiredis
import redis
from redis.cluster import ClusterNode, RedisCluster

from common.processes import alive

# Past maxmemory Redis refuses writes rather than evicting. A volatile-* policy would evict only keys
# with a TTL, but here keys that must not be lost carry one too: the dedup markers (a redelivered event
# would count twice), the erasure tombstones (an erased person would come back) and the rebuild lock.
# Refused writes lose nothing: the API answers 503 and the client retries, a consumer leaves its batch
# pending, and acknowledgements, trims and expiries (none refused) free memory. TTLs and the stream's
# retention keep the steady state under the budget (README, "Memory budget").
MAXMEMORY_POLICY = "noeviction"


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster node: Redis puts its cluster bus 10000 above, so that must be free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class RedisServer:
    data_dir: Path
    port: int
    host: str = "127.0.0.1"
    persist: bool = True
    max_memory_bytes: int = 0  # Redis' 0: no limit (tests); the embedded server takes redis.max_memory_mb
    extra_args: tuple[str, ...] = ()  # more redis-server options (a cluster node's)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def is_running(self) -> bool:
        try:
            return bool(self.client(socket_timeout=0.3, socket_connect_timeout=0.3).ping())
        except redis.RedisError:
            return False

    def start(self, timeout_s: float = 10.0) -> None:
        """Start redis-server in the background; a no-op if it already answers on the port."""
        if self.is_running():
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server is not installed: run `make setup` (Debian: apt-get install redis-server), "
                "or point RECS_REDIS__URL at a Redis you run"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--pidfile", str(self.pid_file),
            "--logfile", str(self.log_file),
            "--daemonize", "yes",
            "--save", "60 1000" if self.persist else "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--maxmemory", str(self.max_memory_bytes),
            "--maxmemory-policy", MAXMEMORY_POLICY,
            *self.extra_args,
        ]  # fmt: skip
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_running():
                return
            time.sleep(0.05)
        raise RedisServerError(f"redis-server did not answer on port {self.port}; see {self.log_file}")

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the server this data_dir runs; returns False if none was running."""
        pid = self._pid()
        if pid is None:
            return False
        try:
            self.client(socket_timeout=1).shutdown(nosave=not self.persist)
        except redis.RedisError:
            pass  # shutdown closes the connection before answering
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """Kill -9, as a crash would (tests of degraded serving use this)."""
        pid = self._pid()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.02)

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None


def embedded_server(settings_redis: object) -> RedisServer:
    """The private server described by RedisSettings."""
    from common.settings import RedisSettings

    assert isinstance(settings_redis, RedisSettings)
    return RedisServer(
        data_dir=settings_redis.data_dir or Path("var/redis"),
        port=settings_redis.port or free_port(),
        host=settings_redis.host,
        max_memory_bytes=settings_redis.max_memory_mb * 1024 * 1024,
    )


CLUSTER_SCHEME = "redis+cluster://"  # RECS_REDIS__URL=redis+cluster://host:port[,host:port...]


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a `redis+cluster://[user:password@]host:port[,host:port...][/0]` URL."""
    netloc = url[len(CLUSTER_SCHEME) :].split("/", 1)[0].rpartition("@")[2]
    nodes = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster node must be host:port, got {part!r} in {url!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def connect(url: str, timeout_s: float = 0.5) -> redis.Redis:
    """A client with short timeouts, so a dead Redis degrades a request instead of hanging it.

    A `redis+cluster://` URL gives a redis.cluster.RedisCluster seeded with its nodes (it learns the
    others and the slot map from them). It is typed as redis.Redis because callers use the commands
    both share; the code paths that differ (scripts across slots, lanes on one connection) ask
    `is_cluster`. Both speak the client library's default protocol, so replies parse alike."""
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    credentials = url[len(CLUSTER_SCHEME) :].split("/", 1)[0].rpartition("@")[0]
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=unquote(username) or None,
        password=unquote(password) or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return cast(redis.Redis, client)


def pubsub_url(url: str) -> str:
    """A plain URL to subscribe with: on a Redis Cluster, its first seed node (a PUBLISH reaches the
    subscribers of every node), else `url` itself."""
    if not is_cluster_url(url):
        return url
    host, port = cluster_nodes(url)[0]
    credentials = url[len(CLUSTER_SCHEME) :].split("/", 1)[0].rpartition("@")[0]
    return f"redis://{credentials + '@' if credentials else ''}{host}:{port}/0"


def is_cluster(client: object) -> bool:
    """Whether `client` talks to a Redis Cluster (scripts then touch one slot each)."""
    return isinstance(client, RedisCluster)


Arg = str | bytes | int | float


def lean_pipeline(client: redis.Redis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    """The replies of `commands`, sent in one round trip, as `execute_command` of each would parse them,
    for a single Redis, with less of redis-py's per-call Python work. For the commands every request
    sends: serving's read and today's counts, the API's appends to the event stream.

    redis-py checks each argument's type in Python, wraps the call in its retry and observability
    hooks, and then parses the reply; on this machine that is ~80 µs of CPU beyond the round trip for a
    ZMSCORE of 170 members, and ~40 µs for a PING. Here hiredis packs the arguments in one C call (it
    formats them as redis-py does: str as UTF-8, a number as its repr) and each reply goes through the
    client's callback for its command. An error reply is raised once every reply is read, the first one,
    as a pipeline's `execute()` raises it (NoScriptError included), and leaves the connection usable. A
    lost connection falls back to redis-py's own path (`execute_command`, or a pipeline for several),
    which reconnects and retries as the client is configured to, so a command may run twice, as with
    redis-py's retries: a read-only one, or an append whose event the consumers and the lake writer
    deduplicate by its id. A cluster client always takes redis-py's path (each command to its slot's node)."""
    if is_cluster(client):
        return _through_redis_py(client, commands)
    pool = client.connection_pool
    connection = pool.get_connection()
    replies: list[Any] = []
    try:
        # hiredis' stub types its argument as a 1-tuple; it takes a tuple of any length.
        packed = b"".join(hiredis.pack_command(tuple(command)) for command in commands)  # type: ignore[arg-type]
        connection.send_packed_command([packed], check_health=False)
        for _ in commands:
            try:
                replies.append(connection.read_response())
            except redis.ResponseError as exc:  # read whole: the next reply follows on the connection
                replies.append(exc)
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        connection.disconnect()
        pool.release(connection)
        return _through_redis_py(client, commands)
    except BaseException:
        connection.disconnect()  # a reply may be left half read
        pool.release(connection)
        raise
    pool.release(connection)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply
    callbacks = client.response_callbacks
    out = []
    for command, reply in zip(commands, replies, strict=True):
        callback = callbacks.get(command[0])
        out.append(callback(reply) if callback is not None else reply)
    return out


def _through_redis_py(client: redis.Redis, commands: Sequence[Sequence[Arg]]) -> list[Any]:
    if len(commands) == 1:
        return [client.execute_command(*commands[0])]
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return list(pipe.execute())


@dataclass
class LocalRedisCluster:
    """A Redis Cluster on loopback from the same redis-server binary: `masters` masters with `replicas`
    replicas each, one RedisServer (a process, its data under data_dir/<port>) per node, joined by
    `redis-cli --cluster create`. `recs cluster up --redis-cluster` and the test fixture use it."""

    data_dir: Path
    ports: tuple[int, ...]
    replicas: int = 1
    host: str = "127.0.0.1"
    node_timeout_ms: int = 2000  # how long a master may be silent before its replica takes over
    persist: bool = False

    @property
    def nodes(self) -> list[RedisServer]:
        return [
            RedisServer(
                data_dir=self.data_dir / str(port), port=port, host=self.host, persist=self.persist,
                extra_args=(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                ),
            )  # fmt: skip
            for port in self.ports
        ]

    @property
    def url(self) -> str:
        masters = len(self.ports) // (1 + self.replicas)
        return CLUSTER_SCHEME + ",".join(f"{self.host}:{port}" for port in self.ports[:masters])

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every node, then join them (once: a cluster whose nodes know each other stays formed)."""
        for node in self.nodes:
            node.start()
        if not self.is_formed():
            binary = shutil.which("redis-cli")
            if binary is None:
                raise RedisServerError("redis-cli is not installed (Debian: apt-get install redis-tools)")
            addresses = [f"{self.host}:{port}" for port in self.ports]
            subprocess.run(
                [binary, "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, timeout=timeout_s,
            )  # fmt: skip
        self.wait_ok(timeout_s)

    def is_formed(self) -> bool:
        """Every node knows who serves each slot: joined before (nodes.conf, kept when a node restarts), so
        the nodes find each other again by themselves, where another `--cluster create` would fail."""
        try:
            for node in self.nodes:
                info = node.client(socket_timeout=1, decode_responses=True).execute_command("CLUSTER", "INFO")
                if "cluster_slots_assigned:16384" not in (info if isinstance(info, str) else str(info)):
                    return False
        except redis.RedisError:
            return False
        return True

    def is_ok(self) -> bool:
        """Every node answers, sees cluster_state:ok and all slots served, and every replica is linked."""
        try:
            for node in self.nodes:
                client = node.client(socket_timeout=1, decode_responses=True)
                info = client.execute_command("CLUSTER", "INFO")
                text = info if isinstance(info, str) else str(info)
                if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ok():
            if time.monotonic() > deadline:
                raise RedisServerError(f"the Redis Cluster on {self.ports} did not reach state ok")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
