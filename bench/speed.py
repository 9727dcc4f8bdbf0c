"""Speed-layer benchmark: events/s one consumer sustains with all effects on, and XADD-to-readable freshness;
with `consumers`, events/s of 1, 2, 4... consumer processes sharing the stream, on one Redis or a Redis Cluster.

Starts its own redis-server on a free port (or a 3-master 3-replica cluster) and publishes a synthetic
model (items x factors) to a temporary registry, so it measures the layer itself and touches nothing
of the running system.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common import redis_keys
from common.catalog import Item
from common.catalog_state import load_items
from common.events import Event, EventType, new_event_id
from common.key_memory import keyspace_usage
from common.messages import RecsChangedBatch
from common.model import save_factors
from common.redis_server import LocalRedisCluster, RedisServer, connect, free_cluster_port, free_port
from common.registry import Manifest, Registry
from common.settings import Settings
from common.stream import FIELD, append_events, group_lag

if TYPE_CHECKING:
    from bench.serve import RealLake

VERSION = "bench-v1"
TYPES = [EventType.VIEW] * 14 + [EventType.CLICK] * 3 + [EventType.ADD_TO_CART] * 2 + [EventType.PURCHASE]
SESSION_EVENTS = 10  # events of one session in the bench's traffic
VISITOR_GAP_S = 0.1  # the freshness mix: each visitor sends an event every this many seconds
OFFERED_PER_S = 10_000.0  # events/s the freshness run offers, and so how many visitors browse at once


def run_speed_bench(
    events: int = 50_000,
    items: int = 50_000,
    users: int = 20_000,
    factors: int = 64,
    offered_per_s: float = OFFERED_PER_S,
    freshness_s: float = 5.0,
    seed: int = 0,
    repeats: int = 3,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recs-bench-speed-") as tmp:
        root = Path(tmp)
        server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        server.start()
        try:
            settings = _settings(root, server.url)
            client = server.client()
            _publish_model(settings, items, users, factors, seed)
            # This machine's speed drifts by tens of percent within seconds: report the median run. Each
            # repeat drains the sessions' events in a row, then the same traffic from visitors browsing at
            # once (the freshness mix), where a chunk's events are of different sessions.
            runs: list[dict[str, Any]] = []
            browsing_runs: list[dict[str, Any]] = []
            visitors = _visitors(offered_per_s, users)
            for _ in range(repeats):
                for browsing, out in ((None, runs), (visitors, browsing_runs)):
                    _fresh_state(client, items)
                    out.append(_throughput(client, settings, events, items, users, seed, browsing))
            throughput = _median_run(runs)
            throughput["browsing"] = {
                "visitors": visitors,
                **{key: value for key, value in _median_run(browsing_runs).items() if key in _BROWSING_FIELDS},
            }
            # Its tail is the machine's hiccups as much as the consumer's: one run's p99 spread 20-73 ms.
            freshness_runs = []
            for _ in range(repeats):
                _fresh_state(client, items)
                freshness_runs.append(_freshness(server.url, root, settings, offered_per_s, freshness_s, items, users, seed))
            freshness = _median_freshness(freshness_runs)
        finally:
            server.stop()
    return {
        **throughput,
        **freshness,
        "items": items,
        "factors": factors,
        "users_with_vectors": users,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def run_speed_scaling(
    consumers: Sequence[int],
    redis_cluster: bool = False,
    events: int = 20_000,
    items: int = 10_000,  # fewer than the one-consumer bench: loading them into a cluster is slow
    users: int = 20_000,
    factors: int = 64,
    seed: int = 0,
    repeats: int = 1,
) -> dict[str, Any]:
    """events/s of N consumer processes draining one backlog of `events`, for each N in `consumers`: from
    the moment all are warm (model loaded) to the group's lag and pending both 0."""
    stop: Callable[[], object]
    # A bench stopped with SIGTERM (a timeout) still stops its servers: the servers are daemons.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="recs-bench-speed-") as tmp:
        root = Path(tmp)
        if redis_cluster:
            cluster = LocalRedisCluster(root / "redis", tuple(free_cluster_port() for _ in range(6)))
            cluster.start()
            url, stop = cluster.url, cluster.stop
        else:
            server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
            server.start()
            url, stop = server.url, server.stop
        try:
            settings = _settings(root, url)
            client = connect(url, timeout_s=30)
            _publish_model(settings, items, users, factors, seed)
            by_n: dict[str, Any] = {}
            for n in consumers:
                runs = []
                for _ in range(repeats):
                    _fresh_state(client, items)
                    rng = np.random.default_rng(seed)
                    for start in range(0, events, 5000):
                        chunk = [_event(rng, j, items, users) for j in range(start, min(events, start + 5000))]
                        append_events(client, chunk, settings.redis.stream, settings.redis.stream_retention_ms)
                    runs.append(round(events / _drain_with(n, url, root, settings, client)))
                by_n[str(n)] = {"events_per_s": statistics.median(runs), "events_per_s_runs": runs}
            memory = keyspace_usage(client, budget_s=10).as_json()  # what the last run's events left
        finally:
            stop()
            signal.signal(signal.SIGTERM, previous)
    return {
        "redis": "cluster (3 masters, 3 replicas)" if redis_cluster else "one redis-server",
        "consumers": by_n,
        "memory_after_last_run": memory,
        "events": events,
        "items": items,
        "factors": factors,
        "users_with_vectors": users,
        "batch_size": settings.speed.batch_size,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _drain_with(n: int, url: str, root: Path, settings: Settings, client: Any) -> float:
    """Seconds n consumer processes take to drain the stream once all of them are ready."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    workers = [
        context.Process(target=_drain_when_told, args=(url, str(root), f"bench-{j}", ready, go)) for j in range(n)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            if not ready.acquire(timeout=120):
                raise RuntimeError("a bench consumer did not start within 2 minutes")
        started = time.perf_counter()
        go.set()
        stream, group = settings.redis.stream, settings.speed.group
        while group_lag(client, stream, group) > 0 or client.xpending(redis_keys.stream(stream), group)["pending"]:
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def _drain_when_told(url: str, root: str, name: str, ready: Any, go: Any) -> None:
    from speed_layer.consumer import SpeedConsumer

    consumer = SpeedConsumer(connect(url, timeout_s=30), _settings(Path(root), url), name=name)
    consumer.warm_up()
    ready.release()
    go.wait()
    while True:  # until the parent has seen the stream drained and ends the process
        consumer.pump(block=True)


def _fresh_state(client: Any, items: int) -> None:
    """An empty Redis with the catalog loaded and the model's version served (as if the switch had
    run: the benchmark measures live work only)."""
    client.flushall()
    load_items(client, (Item(item_id=f"i{j}", category_path=[f"c{j % 200}"]) for j in range(items)))
    client.set(redis_keys.SPEED_VERSION, VERSION)


def _settings(root: Path, url: str) -> Settings:
    return Settings(
        var_dir=root,
        redis={"url": url},  # type: ignore[arg-type]
        lake={"root": str(root / "lake")},  # type: ignore[arg-type]
        models={"root": str(root / "models")},  # type: ignore[arg-type]
    )


def _publish_model(settings: Settings, items: int, users: int, factors: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    registry = Registry(settings.models.root)
    save_factors(
        registry, VERSION,
        [f"u{j}" for j in range(users)], (rng.normal(size=(users, factors)) * 0.1).astype(np.float32),
        [f"i{j}" for j in range(items)], (rng.normal(size=(items, factors)) * 0.1).astype(np.float32),
        top_items=0,  # the consumer never reads the lists (serving does)
    )  # fmt: skip
    now = datetime.now(UTC)
    registry.write_manifest(
        Manifest(version=VERSION, created_at=now, cutoff=now - timedelta(days=1), engine="bench")
    )
    registry.activate(VERSION)


def _event(rng: np.random.Generator, n: int, items: int, users: int, person: str | None = None) -> Event:
    """A storefront-like event: 70% logged-in users with a batch vector; event n is in session
    n // SESSION_EVENTS."""
    now = datetime.now(UTC)
    session = n // SESSION_EVENTS
    if person is None:
        person = f"u{session % users}" if session % 10 < 7 else f"anon{session}"
    kind = TYPES[int(rng.integers(len(TYPES)))]
    return Event(
        event_id=new_event_id(),
        event_type=kind,
        ts=now,
        received_at=now,
        anonymous_id=f"dev-{person}",
        user_id=person if person.startswith("u") else None,
        session_id=f"s{session}",
        item_id=f"i{min(items - 1, int(rng.zipf(1.3)) - 1)}",
        dwell_ms=int(rng.integers(0, 60_000)),
    )


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda run: run["events_per_s"])
    return {**ordered[len(ordered) // 2], "events_per_s_runs": [run["events_per_s"] for run in ordered]}


def _median_freshness(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of the median p99, with every run's p50 and p99 (each in ascending order)."""
    ordered = sorted(runs, key=lambda run: run["freshness_p99_ms"])
    return {
        **ordered[len(ordered) // 2],
        "freshness_p50_ms_runs": sorted(run["freshness_p50_ms"] for run in runs),
        "freshness_p99_ms_runs": [run["freshness_p99_ms"] for run in ordered],
    }


# What the browsing mix's throughput reports (the rest is the same settings as the in-a-row runs').
_BROWSING_FIELDS = (
    "events_per_s", "events_per_s_runs", "consumer_cpu_us_per_event", "redis_cpu_us_per_event",
    "redis_commands_per_event", "redis_commands_per_event_by_name",
)  # fmt: skip


def _visitors(offered_per_s: float, users: int) -> int:
    """Visitors browsing at once when `offered_per_s` events/s come, each every VISITOR_GAP_S."""
    return min(users, max(1, round(offered_per_s * VISITOR_GAP_S)))


def _throughput(
    client: Any, settings: Settings, events: int, items: int, users: int, seed: int, visitors: int | None = None
) -> dict[str, Any]:
    """Events/s of one consumer draining `events` events: each session's in a row, or with `visitors`
    from that many visitors browsing at once (`browsing_order`)."""
    append_traffic(client, settings, events, items, users, seed, visitors)
    return _drain(client, settings, events)


def append_traffic(
    client: Any, settings: Settings, events: int, items: int, users: int, seed: int, visitors: int | None = None
) -> None:
    """`events` events on the stream: each session's in a row, or with `visitors` from that many visitors
    browsing at once (`browsing_order`)."""
    rng = np.random.default_rng(seed)
    numbers = list(browsing_order(events, visitors)) if visitors else list(range(events))
    for start in range(0, events, 5000):  # generated a chunk at a time: the consumer's heap is its own
        chunk = [_event(rng, n, items, users) for n in numbers[start : start + 5000]]
        append_events(client, chunk, settings.redis.stream, settings.redis.stream_retention_ms)


def _drain(client: Any, settings: Settings, events: int) -> dict[str, Any]:
    """One consumer drains the `events` waiting in the stream: events/s, CPU and Redis commands an event."""
    from speed_layer.consumer import SpeedConsumer

    consumer = SpeedConsumer(client, settings, name="bench")
    consumer.warm_up()  # as `run` does
    warm_up = consumer.poll_once(block=False)  # registers scripts, fills the category cache a little
    client.config_resetstat()  # the bench's own server: the counts below are the timed drain's
    redis_cpu, consumer_cpu = _redis_cpu_s(client), time.process_time()
    started = time.perf_counter()
    while consumer.pump(block=False):  # the overlapped loop `run` uses
        pass
    elapsed = time.perf_counter() - started
    timed = events - warm_up
    # CPU seconds per event say where the time goes even when other work shares the machine.
    consumer_cpu, redis_cpu = time.process_time() - consumer_cpu, _redis_cpu_s(client) - redis_cpu
    assert group_lag(client, settings.redis.stream, settings.speed.group) == 0
    commands = _commands(client)
    return {
        "events_per_s": round(timed / elapsed),
        "throughput_events": timed,
        "consumer_cpu_us_per_event": round(consumer_cpu / timed * 1e6, 1),
        "redis_cpu_us_per_event": round(redis_cpu / timed * 1e6, 1),
        # Counted, not timed, so they compare across runs on a busy machine: the commands Redis ran per
        # event (those inside the scripts included), the most frequent first.
        "redis_commands_per_event": round(sum(commands.values()) / timed, 2),
        "redis_commands_per_event_by_name": {
            name: round(calls / timed, 2)
            for name, calls in sorted(commands.items(), key=lambda kv: -kv[1])[:8]
        },
        "batch_size": settings.speed.batch_size,
        "script_chunk": settings.speed.script_chunk,
        "script_chunk_min": settings.speed.script_chunk_min,
    }


def run_speed_bench_on_lake(real: RealLake, repeats: int = 3) -> dict[str, Any]:
    """Events/s of one consumer draining a store's own last `real.days` days of events in their arrival
    order (its sessions interleave as the store's stream did), on the model trained on the days before
    (bench/lake_state.py) and the lake's catalog; each repeat on a fresh Redis, the median reported."""
    from bench.lake_state import lake_settings, recent_events, trained_version
    from bench.serve import stage_events, state_label
    from common.lake import Lake

    with tempfile.TemporaryDirectory(prefix="recs-bench-speed-lake-") as tmp:
        root = Path(tmp)
        server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        server.start()
        try:
            settings = lake_settings(root, real.root, real.models or root / "models", server.url)
            version = trained_version(settings, real.days)
            lake = Lake(real.root)
            events = recent_events(lake, real.days)
            client = server.client()
            runs = []
            for _ in range(repeats):
                client.flushall()  # live work only: the version is served as if the switch had run
                stage_events(client, settings, version, lake, events)
                runs.append(_drain(client, settings, len(events)))
        finally:
            server.stop()
    return {
        **_median_run(runs),
        "state": state_label(real),
        "events": len(events),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _commands(client: Any) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT, the statistics commands themselves left out."""
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
    return {name: n for name, n in calls.items() if name not in ("info", "config|resetstat")}


def _redis_cpu_s(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _consume_forever(url: str, root: str) -> None:
    from common.redis_server import connect
    from speed_layer.consumer import SpeedConsumer

    settings = _settings(Path(root), url)
    SpeedConsumer(connect(url, timeout_s=5), settings, name="fresh").run()


def browsing_order(total: int, visitors: int) -> Iterator[int]:
    """The event numbers (`_event`'s n) of `visitors` browsing at once: each sends its session's
    SESSION_EVENTS events one at a time, in turn with the others, and a new visitor takes the place of
    one whose session ended. So a person's events are `visitors` events apart, as a storefront's are,
    and no two visitors browsing at once are the same person (while `visitors` <= users)."""
    for e in range(total):
        slot, turn = e % visitors, e // visitors
        session = (turn // SESSION_EVENTS) * visitors + slot
        yield session * SESSION_EVENTS + turn % SESSION_EVENTS


class Unheard:
    """Events sent and not yet announced, per person, oldest first. A RecsChanged names the last event
    of its person that its batch applied, so it covers that one and the person's earlier ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the sender appends while the listener takes
        self._by_person: dict[str, deque[tuple[str, str | None, float]]] = {}

    def sent(self, person: str, event_type: str, item_id: str | None, at: float) -> None:
        with self._lock:
            self._by_person.setdefault(person, deque()).append((event_type, item_id, at))

    def heard(self, person: str, event_type: str, item_id: str | None, at: float) -> list[float]:
        """The latencies (at - sent) of the person's events the message covers; none when it names no
        event still unheard."""
        with self._lock:
            pending = self._by_person.get(person)
            if not pending or (event_type, item_id) not in ((t, i) for t, i, _ in pending):
                return []
            latencies = []
            while True:
                kind, item, sent_at = pending.popleft()
                latencies.append(at - sent_at)
                if (kind, item) == (event_type, item_id):
                    return latencies


def _freshness(
    url: str,
    root: Path,
    settings: Settings,
    offered: float,
    seconds: float,
    items: int,
    users: int,
    seed: int,
) -> dict[str, Any]:
    """Offer `offered` events/s to a consumer process, from visitors browsing at once (one event each
    every VISITOR_GAP_S, sessions of SESSION_EVENTS); latency from XADD to the message whose RecsChanged
    covers the event."""
    from common.redis_server import connect

    client = connect(url, timeout_s=5)
    consumer = multiprocessing.get_context("spawn").Process(target=_consume_forever, args=(url, str(root)))
    consumer.start()
    consumer_ready = time.perf_counter() + 3.0  # the consumer process starts and loads the model
    unheard = Unheard()
    latencies: list[float] = []
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_keys.RECS_CHANNEL)
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message:
                heard = time.perf_counter()
                for changed in RecsChangedBatch.model_validate_json(message["data"]).changes:
                    latencies.extend(unheard.heard(changed.person_id, changed.event_type, changed.item_id, heard))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    visitors = _visitors(offered, users)
    try:
        rng = np.random.default_rng(seed + 1)
        total = int(offered * seconds)
        per_tick = max(1, round(offered * 0.005))  # one pipeline every 5 ms
        # Made and serialised before the clock starts (while the consumer process loads the model), so
        # the sender's own CPU does not cap the rate offered nor take the consumer's core.
        events = [_event(rng, n, items, users) for n in browsing_order(total, visitors)]
        ticks = [
            [(e.person_id, e.event_type.value, e.item_id, e.model_dump_json(exclude_none=True)) for e in events[i : i + per_tick]]
            for i in range(0, total, per_tick)
        ]  # fmt: skip
        del events
        time.sleep(max(0.0, consumer_ready - time.perf_counter()))
        stream_key = redis_keys.stream(settings.redis.stream)
        started = time.perf_counter()
        for t, tick in enumerate(ticks):
            pipe = client.pipeline(transaction=False)
            for *_, payload in tick:
                pipe.xadd(stream_key, {FIELD: payload})
            now = time.perf_counter()
            for person, event_type, item_id, _ in tick:
                unheard.sent(person, event_type, item_id, now)
            pipe.execute()
            time.sleep(max(0.0, started + (t + 1) * per_tick / offered - time.perf_counter()))
        sending_s = time.perf_counter() - started
        time.sleep(1.0)
    finally:
        done.set()
        listener.join()
        consumer.terminate()
        consumer.join()
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "freshness_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "freshness_p99_ms": round(float(np.percentile(ms, 99)), 2),
        "freshness_max_ms": round(float(ms.max()), 2),
        "freshness_offered_events_per_s": offered,
        # What this process managed to send: below the offered rate, the sender (not the consumer) fell short.
        "freshness_sent_events_per_s": round(total / sending_s),
        "freshness_events": int(offered * seconds),
        "freshness_measured": len(latencies),
        "freshness_visitors": visitors,
    }
