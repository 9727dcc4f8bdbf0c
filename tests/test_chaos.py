"""Chaos on real processes: while clients send batches and retry every one that got no 2xx (as tracker.js
does), kill -9 the API right after its XADD, the speed consumer mid-batch and the lake writer mid-flush,
restarting each. Then: every accepted event is in the lake exactly once, and Redis' counters equal the
counts of the unique events (none lost, none applied twice)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from common import redis_keys
from common.events import Event, EventType
from common.features import day_index, implicit_weight
from common.lake import Lake
from common.redis_server import RedisServer, free_port
from common.registry import Registry
from common.settings import Settings
from common.stream import FIELD, group_lag
from tests.speed_factories import make_event, publish_model, speed_settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VERSION = "v1"
ITEMS = 20  # i0..i9 go into carts, i10..i19 are bought: a cart's quantity is then a plain sum
USERS_WITH_VECTORS = ("u0", "u1")
ROUNDS = 6  # each kills the API, the consumer and the lake writer once
BATCH = 50


class Role:
    """One `recs ...` process, killed with SIGKILL and started again; its output goes to a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-c", "from recs.main import app; app()", *self.args]
        with (self.logs / f"{self.name}-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} died on its own"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client(threading.Thread):
    """A storefront: batches of a few people's events, each batch sent until it gets a 2xx."""

    def __init__(
        self, url: str, people: list[tuple[str | None, str]], seed: int, identify: str | None
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.people, self.rng = url, people, random.Random(seed)
        self.identify = identify  # a device that logs in as this user halfway
        self.stop = threading.Event()
        self.accepted: list[Event] = []
        self.retried: list[list[str]] = []  # event ids of batches that needed more than one attempt
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=10) as http:
                sent = 0
                while not self.stop.is_set():
                    batch = [self._event(sent + j) for j in range(BATCH)]
                    if self.identify and sent == 3 * BATCH:
                        device = next(d for u, d in self.people if u is None)
                        batch[0] = make_event(
                            EventType.IDENTIFY, None, anonymous_id=device, user_id=self.identify
                        )
                    self._send_until_accepted(http, batch)
                    sent += len(batch)
                    if self.identify and sent == 4 * BATCH:  # a pre-login batch retried after the login
                        self._send_until_accepted(http, self.accepted[BATCH : 2 * BATCH], again=True)
                    time.sleep(0.02)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _event(self, n: int) -> Event:
        user, device = self.people[self.rng.randrange(len(self.people))]
        if user is None and self.identify and n > 3 * BATCH and self.rng.random() < 0.5:
            user = self.identify  # after the login, some of the device's events carry the user id
        kind = self.rng.choice(
            [EventType.VIEW] * 5 + [EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE]
        )
        item = self.rng.randrange(ITEMS // 2) + (ITEMS // 2 if kind is EventType.PURCHASE else 0)
        quantity = self.rng.randint(1, 3) if kind is EventType.ADD_TO_CART else None
        session = f"s{n // (4 * BATCH)}"
        return make_event(
            kind, f"i{item}", anonymous_id=device, user_id=user, session_id=session, quantity=quantity
        )

    def _send_until_accepted(self, http: httpx.Client, batch: list[Event], again: bool = False) -> None:
        body = [e.model_dump(mode="json", exclude_none=True, exclude={"received_at"}) for e in batch]
        attempts = 0
        while True:
            attempts += 1
            assert attempts < 600, "the API never came back"
            try:
                reply = http.post(self.url, json=body)
                if reply.status_code < 300:
                    break
                assert reply.status_code >= 500, reply.text  # a 4xx is the test's own mistake
            except httpx.TransportError:
                pass  # the API died mid-request: the batch may or may not be in the stream
            time.sleep(0.1)
        if attempts > 1 or again:
            self.retried.append([e.event_id for e in batch])
        if not again:
            self.accepted.extend(batch)


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _api_up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def kill_api_after_xadd(api: Role, watcher: redis.Redis, stream: str) -> bool:
    """SIGKILL the API as soon as an XADD lands, before it can answer; False if none came in time."""
    if not watcher.xread({stream: "$"}, count=1, block=15_000):
        return False
    api.kill()
    return True


def kill_consumer_mid_batch(consumer: Role, client: redis.Redis, stream: str, group: str) -> bool:
    """SIGKILL the consumer while it holds entries it read and has not acknowledged (effects in progress)."""
    assert consumer.proc is not None
    name = f"{socket.gethostname()}-{consumer.proc.pid}-0"  # speed_layer/cli.py names consumer 0 so
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for holder in client.xpending(stream, group)["consumers"]:
            if holder["name"].decode() == name and holder["pending"] > 0:
                consumer.kill()
                return True
        time.sleep(0.002)
    consumer.kill()
    return False


def kill_writer_mid_flush(writer: Role, events_dir: Path) -> bool:
    """SIGKILL the lake writer while a Parquet file of its flush is still a dot-named temp file."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for partition in events_dir.glob("dt=*"):
            if any(name.startswith(".") and name.endswith(".tmp") for name in os.listdir(partition)):
                writer.kill()
                return True
        time.sleep(0.0005)
    writer.kill()
    return False


def test_kills_during_retries_lose_nothing_and_count_nothing_twice(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    server.start()
    try:
        _run_chaos(tmp_path, server)
    finally:
        server.stop()


def chaos_settings(tmp_path: Path, url: str) -> Settings:
    """The settings of a chaos run on the Redis at `url`, with version v1 published."""
    settings = speed_settings(tmp_path, url)
    items = np.random.default_rng(0).normal(0, 0.1, size=(ITEMS, 8)).astype(np.float32)
    publish_model(Registry(settings.models.root), VERSION, datetime.now(UTC) - timedelta(hours=1), items,
                  list(USERS_WITH_VECTORS))  # fmt: skip
    return settings


def chaos_env(tmp_path: Path, settings: Settings, url: str) -> dict[str, str]:
    """What the killed and restarted processes run with: these settings, on the Redis at `url`."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECS_")},
        "PYTHONPATH": str(ROOT),
        "OPENBLAS_NUM_THREADS": "1",
        "RECS_VAR_DIR": str(tmp_path / "var"),
        "RECS_REDIS__URL": url,
        "RECS_LAKE__ROOT": settings.lake.root,
        "RECS_MODELS__ROOT": settings.models.root,
        # Flushes longer than an API restart, so a batch and its retry often land in one flush.
        "RECS_LAKE__FLUSH_EVENTS": "3000",
        "RECS_LAKE__FLUSH_SECONDS": "4",
        "RECS_SPEED__BLOCK_MS": "20",
        "RECS_SPEED__CLAIM_IDLE_MS": "300",
        "RECS_SPEED__CLAIM_INTERVAL_S": "0.1",
    }


def _run_chaos(tmp_path: Path, server: RedisServer) -> None:
    settings = chaos_settings(tmp_path, server.url)
    client = server.client()
    port = free_port()
    env = chaos_env(tmp_path, settings, server.url)
    logs = tmp_path / "logs"
    logs.mkdir()
    api = Role("api", ["serve", "--workers", "1", "--port", str(port)], env, logs)
    consumer = Role("speed", ["speed", "run"], env, logs)
    writer = Role("lake-writer", ["lake-writer", "run"], env, logs)
    roles = (api, consumer, writer)
    stream = redis_keys.stream(settings.redis.stream)
    base = f"http://127.0.0.1:{port}"
    clients = [
        Client(f"{base}/v1/events", [("u0", "d0"), (None, "d2")], seed=1, identify="u2"),
        Client(f"{base}/v1/events", [("u1", "d1"), (None, "d3")], seed=2, identify=None),
        Client(f"{base}/v1/events", [(None, "d4"), (None, "d5")], seed=3, identify=None),
    ]
    kills: Counter[str] = Counter()
    watcher = server.client()
    try:
        for role in roles:
            role.start()
        _wait(lambda: _api_up(f"{base}/healthz"), 60, "the API")
        for c in clients:
            c.start()
        for _ in range(ROUNDS):
            kills["api_after_xadd" if kill_api_after_xadd(api, watcher, stream) else "api_idle"] += 1
            api.start()
            _wait(lambda: _api_up(f"{base}/healthz"), 60, "the API")
            time.sleep(1.0)  # traffic for the others to work on
            hit = kill_consumer_mid_batch(consumer, client, stream, settings.speed.group)
            kills["consumer_mid_batch" if hit else "consumer_idle"] += 1
            consumer.start()
            time.sleep(0.5)
            hit = kill_writer_mid_flush(writer, Path(settings.lake.root) / "events")
            kills["writer_mid_flush" if hit else "writer_idle"] += 1
            writer.start()
            time.sleep(0.5)
            assert all(c.error is None for c in clients), [c.error for c in clients]
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=120)
            assert c.error is None and not c.is_alive(), c.error
        for group in (settings.speed.group, settings.speed.lake_group):
            _wait(lambda g=group: group_lag(client, settings.redis.stream, g) == 0, 90, f"{group} to drain")
    finally:
        for role in roles:
            role.stop()

    accepted = {e.event_id: e for c in clients for e in c.accepted}
    assert len(accepted) == sum(len(c.accepted) for c in clients)  # the clients' ids are unique
    appended = Counter(json.loads(fields[FIELD.encode()])["event_id"] for _, fields in client.xrange(stream))
    retried_after_xadd = [ids for c in clients for ids in c.retried if appended[ids[0]] > 1]
    report = {
        **kills,
        "events": len(accepted),
        "batches_retried": sum(len(c.retried) for c in clients),
        "batches_appended_twice": len(retried_after_xadd),
        "events_appended_twice": sum(n > 1 for n in appended.values()),
    }
    print("chaos:", json.dumps(report))

    # The windows were hit: batches in the stream twice (the API died after XADD and the client retried).
    assert kills["api_after_xadd"] >= ROUNDS and retried_after_xadd, report
    assert kills["consumer_mid_batch"] + kills["consumer_idle"] == ROUNDS
    assert appended.keys() == accepted.keys(), "the stream and the clients disagree"

    landed = Lake(settings.lake.root).read_events(columns=["event_id"])["event_id"].to_pylist()
    duplicated, lost = len(landed) - len(set(landed)), len(accepted.keys() - set(landed))
    assert (duplicated, lost, len(set(landed) - accepted.keys())) == (0, 0, 0), (
        f"lake: {duplicated} duplicated, {lost} lost"
    )

    _assert_redis_counts_unique_events(client, list(accepted.values()), settings)


def _assert_redis_counts_unique_events(client: redis.Redis, events: list[Event], settings: Settings) -> None:
    """Each counter the speed layer keeps, against the same count over the unique events."""
    alias = {e.anonymous_id: e.user_id for e in events if e.event_type is EventType.IDENTIFY}
    counts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    carts: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    weights: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    popularity: dict[int, Counter[str]] = defaultdict(Counter)
    delta_events: Counter[str] = Counter()
    for e in events:
        if e.event_type is EventType.IDENTIFY:
            continue  # merges, counts nothing
        person = e.user_id or alias.get(e.anonymous_id) or e.anonymous_id
        assert e.item_id is not None and e.session_id is not None
        counts[(person, e.session_id)][e.event_type.value] += 1
        if e.event_type is EventType.ADD_TO_CART:
            carts[(person, e.session_id)][e.item_id] += e.quantity or 1
        weight = implicit_weight(e.event_type.value, e.dwell_ms, settings.training)
        if weight > 0:
            weights[person][e.item_id] += weight
            if person in USERS_WITH_VECTORS:
                delta_events[person] += 1
        popularity[day_index(e.ts.timestamp())][e.item_id] += 1

    def text_hash(key: str) -> dict[str, float]:
        return {f.decode(): float(v) for f, v in client.hgetall(key).items()}

    for (person, session), expected in counts.items():
        assert text_hash(redis_keys.session_counts(person, session)) == expected, (person, session)
    for (person, session), expected in carts.items():
        assert text_hash(redis_keys.session_cart(person, session)) == expected, (person, session)
    for person, expected_weights in weights.items():
        stored = text_hash(redis_keys.person_items(person))
        assert stored == pytest.approx(dict(expected_weights)), person
    for day, expected in popularity.items():
        stored = {
            m.decode(): s for m, s in client.zrange(redis_keys.popularity_day(day), 0, -1, withscores=True)
        }
        assert stored == expected, day
    for person in USERS_WITH_VECTORS:
        assert int(client.get(redis_keys.user_event_count(person, VERSION)) or 0) == delta_events[person], (
            person
        )
    for device in alias:  # the device's state moved to the user
        assert not client.exists(redis_keys.person_items(device))
