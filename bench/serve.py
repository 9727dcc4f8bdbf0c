"""`recs bench serve`: the API (2 workers) on a medium synthetic model with live speed state, driven at
fixed rates by a separate process, beside a no-op route on the same server settings.

Before the load, the people of the request mix browse: their events go through the real speed
consumer, so sessions, deltas, affinities, co-visits, neighbour sessions and live counts are what
a request reads. Prints one JSON object: p50/p99 latency and achieved rate at the base rate, errors,
the highest rate whose p99 stays under 50 ms for the API and for the no-op route (and their ratio),
the workers' CPU per request and resident memory, and the mean time per stage inside the workers.
Each request carries its due time as a load balancer's X-Request-Start, so a worker sees how long it
waited; an answer an overloaded worker made cheaper (serving/core/load.py) counts as one past 50 ms,
and `overload` is a step at twice the highest rate held: its latency and the shares shed.
The synthetic model factory here is also what the serving tests publish (small), so both run the
same shapes.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.catalog import Item, items_to_table
from common.content import ItemContent, fit_content_map
from common.features import FEATURE_NAMES
from common.lake import Lake
from common.model import save_content_map, save_factors, save_history, save_ranker, save_table
from common.registry import COVISITATION, POPULARITY, Manifest, Registry
from common.settings import TrainingSettings

# A light module (not the recommender's): every load step's process imports this one.
from serving.core.load import OVERLOAD_BATCH_ONLY, OVERLOAD_NO_NEIGHBOURS, request_start


@dataclass(frozen=True)
class SyntheticModel:
    version: str
    item_ids: list[str]
    user_ids: list[str]
    categories: list[str]  # category of each item, aligned with item_ids
    new_items: list[str]  # created within the last day


# The live catalog of the serve and push benches: a store has items out of stock and a few promoted, and
# serving reads their live sets (a request's cost must not grow with them).
BENCH_OUT_OF_STOCK_EVERY, BENCH_PROMOTED_EVERY = 20, 100  # 5 % and 1 % of the items


def item_category(j: int, n_categories: int) -> str:
    return f"cat{j % n_categories}"


def publish_synthetic_model(
    registry: Registry,
    lake: Lake,
    version: str = "v1",
    n_items: int = 200,
    n_users: int = 50,
    factors: int = 16,
    n_categories: int = 8,
    n_new: int = 3,
    seed: int = 7,
    with_ranker: bool = True,
    activate: bool = True,
    out_of_stock_every: int = 0,
    promoted_every: int = 0,
) -> SyntheticModel:
    """Publish a version whose item factors cluster by category, with catalog, popularity, co-visits, ranker.

    User u leans to category u % n_categories; item j is in category j % n_categories; the last
    `n_new` items were created yesterday (new arrivals), the rest 90 days ago. With `out_of_stock_every`
    k, one item in k is out of stock (j % k == k // 2); with `promoted_every`, one in k is promoted.
    """
    rng = np.random.default_rng(seed)
    centroids = rng.normal(0, 1, (n_categories, factors))
    item_cat = np.arange(n_items) % n_categories
    item_factors = (centroids[item_cat] + 0.35 * rng.normal(0, 1, (n_items, factors))) / np.sqrt(factors)
    user_cat = np.arange(n_users) % n_categories
    user_factors = (centroids[user_cat] + 0.35 * rng.normal(0, 1, (n_users, factors))) / np.sqrt(factors)
    item_ids = [f"i{j}" for j in range(n_items)]
    user_ids = [f"u{u}" for u in range(n_users)]
    save_factors(registry, version, user_ids, user_factors, item_ids, item_factors, top_items=TrainingSettings().top_items_kept)

    counts = np.sort(rng.zipf(1.6, n_items).clip(max=10_000))[::-1].astype(np.int64)
    save_table(registry, version, POPULARITY, pa.table({"item_id": item_ids, "count": counts}))
    # Co-visits: each item with the next few of its own category (item j, j + C, j + 2C, ...).
    src, dst, cnt = [], [], []
    for j in range(n_items):
        for step in (1, 2, 3):
            other = j + step * n_categories
            if other < n_items:
                src.append(item_ids[j])
                dst.append(item_ids[other])
                cnt.append(10 - step)
    save_table(registry, version, COVISITATION, pa.table({"item_id": src, "other_id": dst, "count": cnt}))
    now = datetime.now(UTC)
    cutoff = now - timedelta(hours=1)
    save_history(registry, version, synthetic_history(user_ids, item_ids, n_categories, cutoff), kept=50)
    if with_ranker:
        save_ranker(registry, version, train_toy_ranker(seed))
    # The catalog's content below, so items added later get content vectors (common/content.py).
    contents = [ItemContent(f"Item {j}", ("Root", item_category(j, n_categories)), "", float(10 + j % 50)) for j in range(n_items)]
    save_content_map(registry, version, fit_content_map(contents, item_factors, seed)[0])

    manifest = Manifest(
        version=version,
        created_at=now,
        cutoff=cutoff,
        engine="synthetic",
        parameters={"alpha": 10.0, "regularization": 0.05, "factors": factors},
        metrics={"als": {"ndcg@20": 0.1}},
        status="candidate",
    )
    registry.write_manifest(manifest)
    new_from = n_items - n_new
    items = [
        Item(
            item_id=item_ids[j],
            title=f"Item {j}",
            category_path=["Root", item_category(j, n_categories)],
            price=float(10 + (j % 50)),
            created_at=now - (timedelta(days=1) if j >= new_from else timedelta(days=90)),
            in_stock=not _every(j, out_of_stock_every),
            promoted=_every(j, promoted_every),
        )
        for j in range(n_items)
    ]
    lake.write_catalog(items_to_table(items))
    if activate:
        registry.activate(version, kind="published")
    return SyntheticModel(
        version=version,
        item_ids=item_ids,
        user_ids=user_ids,
        categories=[item_category(j, n_categories) for j in range(n_items)],
        new_items=item_ids[new_from:],
    )


def _every(j: int, k: int) -> bool:
    return k > 0 and j % k == k // 2


def synthetic_history(user_ids: list[str], item_ids: list[str], n_categories: int, cutoff: datetime) -> pa.Table:
    """Interactions' history columns: user u engaged with 5 items of its category before the cutoff, the
    k-th of them in 1 + k % 3 sessions, last on the (k + 1)-th day before it."""
    rows = [
        (user, item_ids[item], 1 + k % 3, (cutoff - timedelta(days=k + 1)).timestamp())
        for u, user in enumerate(user_ids)
        for k, item in enumerate(range(u % n_categories + n_categories, len(item_ids), n_categories))
        if k < 5
    ]
    person, item, sessions, last_s = zip(*rows, strict=True) if rows else ((), (), (), ())
    return pa.table({"person_id": person, "item_id": item, "sessions": sessions, "last_s": last_s})


def train_toy_ranker(seed: int) -> Any:
    """A small LambdaRank booster over FEATURE_NAMES whose labels follow ALS score, co-visits and affinity."""
    import lightgbm

    rng = np.random.default_rng(seed)
    groups, size = 60, 30
    x = rng.normal(0, 1, (groups * size, len(FEATURE_NAMES))).astype(np.float32)
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    signal = x[:, col["als_score"]] + 0.8 * x[:, col["covis"]] + 0.8 * x[:, col["category_affinity"]]
    labels = np.digitize(signal, [0.5, 1.5]).astype(np.int32)
    data = lightgbm.Dataset(x, labels, group=[size] * groups, feature_name=list(FEATURE_NAMES))
    params = {"objective": "lambdarank", "num_leaves": 7, "learning_rate": 0.2, "verbose": -1, "seed": seed}
    return lightgbm.train(params, data, num_boost_round=20)


# ---------------------------------------------------------------- live state: the mix's people browse


@dataclass(frozen=True)
class Visitor:
    """One person of the request mix with a live session: a known user (with a batch vector) or a device."""

    user_id: str | None
    anonymous_id: str
    session_id: str
    items: list[str]  # what they viewed, oldest first


TYPES = ["view"] * 14 + ["click"] * 3 + ["add_to_cart"] * 2 + ["purchase"]


def browse(
    model: SyntheticModel, n_users: int, n_devices: int, n_categories: int, events_each: int = 20, seed: int = 3
) -> tuple[list[Visitor], list[Any]]:
    """Sessions of `events_each` events for `n_users` known users and `n_devices` anonymous devices, each in
    the category the person leans to, items drawn by a Zipf law inside it (so sessions share items:
    co-visits and neighbour sessions), events interleaved as they would arrive over the last minutes."""
    from common.events import Event, EventType, new_event_id

    rng = np.random.default_rng(seed)
    per_category = len(model.item_ids) // n_categories
    n_users = min(n_users, len(model.user_ids))
    users = rng.choice(len(model.user_ids), n_users, replace=False)
    visitors = []
    for n in range(n_users + n_devices):
        if n < n_users:
            user: str | None = model.user_ids[int(users[n])]
            category = int(users[n]) % n_categories  # the synthetic user leans to this one
        else:
            user, category = None, int(rng.integers(n_categories))
        ranks = np.minimum(rng.zipf(1.4, events_each), per_category) - 1
        items = [model.item_ids[category + n_categories * int(r)] for r in ranks]
        visitors.append(Visitor(user, f"dev-{n}", f"s-{n}", items))
    now = datetime.now(UTC)
    events = []
    for step in range(events_each):  # step by step across everyone, as a busy store's stream looks
        at = now - timedelta(seconds=(events_each - step) * 15)
        for visitor in visitors:
            kind = EventType(TYPES[int(rng.integers(len(TYPES)))])
            events.append(
                Event(
                    event_id=new_event_id(), event_type=kind, ts=at, received_at=at,
                    anonymous_id=visitor.anonymous_id, user_id=visitor.user_id, session_id=visitor.session_id,
                    item_id=visitor.items[step], dwell_ms=int(rng.integers(0, 60_000)),
                )
            )  # fmt: skip
    return visitors, events


def stage_events(client: Any, settings: Any, version: str, lake: Lake, events: list[Any]) -> None:
    """The lake's catalog live, `version` served (as if the switch had run for it), the events in the
    stream: what a consumer then drains."""
    from common import redis_keys
    from common.catalog import table_to_items
    from common.catalog_state import load_items
    from common.stream import append_events

    load_items(client, table_to_items(lake.read_catalog()))  # the live catalog: categories for affinities
    client.set(redis_keys.SPEED_VERSION, version)
    for start in range(0, len(events), 5000):
        append_events(client, events[start : start + 5000], settings.redis.stream, settings.redis.stream_retention_ms)


def fold_into_speed_state(client: Any, settings: Any, version: str, lake: Lake, events: list[Any]) -> int:
    """Run the events through the real speed consumer (as `recs speed run` would); returns how many it applied."""
    from common import redis_keys
    from speed_layer.consumer import SpeedConsumer

    stage_events(client, settings, version, lake, events)
    consumer = SpeedConsumer(client, settings, name="bench-serve")
    consumer.warm_up()
    applied = 0
    while handled := consumer.pump(block=False):
        applied += handled
    # The trending list as a running consumer keeps it: re-summed now, past the lock its start took.
    client.delete(redis_keys.TRENDING_REFRESH_LOCK)
    if not consumer.refresh_trending():
        raise RuntimeError("the trending list was not re-summed")
    return applied


def request_paths(visitors: list[Visitor], n: int = 2000, seed: int = 1) -> list[str]:
    """The mix: known users (home page), anonymous devices mid-session, product pages (of items in the
    person's category), every person with a live session."""
    rng = random.Random(seed)
    users = [v for v in visitors if v.user_id]
    devices = [v for v in visitors if not v.user_id] or visitors  # a shop of signed-in people only
    paths = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 1):
            paths.append(f"/v1/recommendations?user_id={rng.choice(users).user_id}&k=10")
        elif kind == 2:
            device = rng.choice(devices)
            paths.append(
                f"/v1/recommendations?anonymous_id={device.anonymous_id}&session_id={device.session_id}&k=10"
            )
        else:
            visitor = rng.choice(visitors)
            person = f"user_id={visitor.user_id}" if visitor.user_id else f"anonymous_id={visitor.anonymous_id}"
            paths.append(f"/v1/recommendations?{person}&context=product&item_id={rng.choice(visitor.items)}&k=10")
    return paths


# ---------------------------------------------------------------- the load process


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def as_request(path: str | bytes) -> bytes:
    """A load step's request as sent: a path is a GET of it; bytes are a whole request (a POST's head and body)."""
    return path if isinstance(path, bytes) else f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def stamped(request: bytes, due_epoch_s: float) -> bytes:
    """`request` with the X-Request-Start a load balancer would add (serving/core/load.py): the load process
    queues a request that finds all its connections busy, as a balancer does, and the server sees that wait."""
    name, value = request_start(due_epoch_s)
    head, blank, body = request.partition(b"\r\n\r\n")
    return b"%s\r\n%s: %s%s%s" % (head, name.encode(), value.encode(), blank, body)


async def _drive(
    port: int, rate: float, seconds: float, paths: Sequence[str | bytes], connections: int
) -> dict[str, Any]:
    """Open-loop load: request i is due at i/rate; latency counts from when it was due (no coordinated omission).
    A 2xx answer is a success; those an overloaded worker made cheaper (serving/core/load.py) are counted."""
    requests = [as_request(path) for path in paths]
    due_queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    shed = {"neighbours": 0, "batch_only": 0}
    slow_or_shed = 0  # answers past 50 ms or made cheaper: what a rate held may have 1 % of
    reasons = {"neighbours": OVERLOAD_NO_NEIGHBOURS.encode(), "batch_only": OVERLOAD_BATCH_ONLY.encode()}

    async def worker() -> None:
        nonlocal errors, slow_or_shed
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            job = await due_queue.get()
            if job is None:
                break
            due, request = job
            try:
                writer.write(request)
                await writer.drain()
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if status_line[9:10] != b"2":  # "HTTP/1.1 2xx"
                    errors += 1
                cheaper = False
                for what, reason in reasons.items():
                    if reason in body:
                        shed[what] += 1
                        cheaper = True
                latency = (time.perf_counter() - due) * 1000
                latencies.append(latency)
                slow_or_shed += cheaper or latency > 50
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    to_epoch = time.time() - time.perf_counter()
    start = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due_queue.put_nowait((due, stamped(random.choice(requests), due + to_epoch)))
    for _ in workers:
        due_queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "rps": len(latencies) / elapsed,
        "requests": len(latencies),
        "errors": errors,
        # Shares of the answers: without session-kNN, and batch-only.
        "shed": {what: round(count / max(1, len(latencies)), 4) for what, count in shed.items()},
        "slow_or_shed": round(slow_or_shed / max(1, len(latencies)), 4),
    }


def _load_process(port: int, rate: float, seconds: float, paths: Sequence[str | bytes], out: Any) -> None:
    out.put(asyncio.run(_drive(port, rate, seconds, paths, connections=64)))


def run_load(port: int, rate: float, seconds: float, paths: Sequence[str | bytes]) -> dict[str, Any]:
    """Run one load step in a separate process (so the client does not share the API's interpreter)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, rate, seconds, paths, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return dict(result)


def _wait_ready(port: int, timeout_s: float = 120.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until the API on `port` answers /readyz with 200; RuntimeError after `timeout_s`, or as soon as
    `process` (the server, when given) has exited."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}) before it was ready on port {port}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the API did not become ready on port {port}")


def _workers(server_pid: int) -> list[Any]:
    """The uvicorn worker processes (children of the server), or the server itself with one worker."""
    import psutil

    parent = psutil.Process(server_pid)
    return parent.children(recursive=True) or [parent]


def _workers_rss_mb(server_pid: int) -> float:
    """Largest resident set among the worker processes."""
    return max(p.memory_info().rss for p in _workers(server_pid)) / 2**20


def _workers_cpu_s(server_pid: int) -> float:
    return sum(t.user + t.system for t in (p.cpu_times() for p in _workers(server_pid)))


def _redis_cpu_s(client: Any) -> float:
    """The bench's redis-server's CPU seconds so far: its reads' cost, which the workers' CPU leaves out."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _stage_seconds(port: int) -> dict[str, tuple[float, float]]:
    """stage -> (sum of seconds, count) from the workers' `recs_stage_seconds` summary on /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0).text
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for suffix, slot in (("_sum", 0), ("_count", 1)):
            prefix = f"recs_stage_seconds{suffix}{{"
            if line.startswith(prefix):
                stage = line[len(prefix) :].split('stage="', 1)[1].split('"', 1)[0]
                out.setdefault(stage, [0.0, 0.0])[slot] += float(line.rsplit(" ", 1)[1])
    return {stage: (total, count) for stage, (total, count) in out.items()}


def _stage_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Mean milliseconds per request of each stage between two reads of /metrics."""
    split = {}
    for stage, (total, count) in after.items():
        total0, count0 = before.get(stage, (0.0, 0.0))
        if count > count0:
            split[stage] = round((total - total0) / (count - count0) * 1000, 3)
    return split


def _overload_step(step: dict[str, Any] | None, rate: float) -> dict[str, Any] | None:
    if step is None:
        return None
    rounded = {key: round(step[key], 2) for key in ("rps", "p50_ms", "p99_ms")}
    return {"rate": round(rate, 1), **rounded, "errors": step["errors"], "shed": step["shed"]}


def _keeps_up(step: dict[str, Any], rate: float) -> bool:
    """p99 within 50 ms, no error, the rate delivered; and an answer an overloaded worker made cheaper counts
    as one past 50 ms: at most 1 % of the answers either (a rate held by shedding work is not held)."""
    within_50ms = step["p99_ms"] <= 50 and step["slow_or_shed"] <= 0.01
    return bool(within_50ms and step["errors"] == 0 and step["rps"] >= 0.95 * rate)


def highest_rate_under_50ms(
    port: int, paths: Sequence[str | bytes], start_rate: float, step_seconds: float, max_rate: float, bisections: int = 3
) -> tuple[float, list[dict[str, Any]]]:
    """The highest rate whose p99 stays <= 50 ms: up by 1.5x from `start_rate` until a step fails (or down
    until one holds), then `bisections` halvings of the gap between the last rate held and the first
    failed. Returns it with every step run (rate, p99, rps, held)."""
    steps: list[dict[str, Any]] = []

    def holds(rate: float) -> bool:
        result = run_load(port, rate, step_seconds, paths)
        held = _keeps_up(result, rate)
        steps.append({"rate": round(rate, 1), "p99_ms": round(result["p99_ms"], 2), "rps": round(result["rps"], 1),
                      "shed": result["shed"], "held": held})  # fmt: skip
        return held

    good, bad = 0.0, None
    rate = start_rate
    if holds(rate):
        good = rate
        while rate * 1.5 <= max_rate:
            rate *= 1.5
            if not holds(rate):
                bad = rate
                break
            good = rate
    else:
        bad = rate
        while rate > 10:
            rate /= 1.5
            if holds(rate):
                good = rate
                break
            bad = rate
    if bad is None or good <= 0:
        return good, steps
    for _ in range(bisections):
        middle = (good + bad) / 2
        if holds(middle):
            good = middle
        else:
            bad = middle
    return good, steps


def _start_server(
    module: str, workers: int, port: int, env: dict[str, str], tree: Path | None = None
) -> subprocess.Popen[bytes]:
    """`python -m module` serving on `port`, ready; from the checkout `tree` (its directory first on the
    path, as `-m` puts the working directory) when given, else this one's."""
    if tree is not None:
        env = {**env, "PYTHONPATH": os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    server = subprocess.Popen(
        [sys.executable, "-m", module, "--workers", str(workers), "--port", str(port)],
        env=env,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(port, process=server)
    except BaseException:  # a server that never became ready is not left running
        _stop_server(server)
        raise
    return server


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(timeout=30)


@dataclass
class LiveState:
    """The bench's world: Redis with the speed state of the request mix's people, the registry and lake,
    the environment a server (or a child process) reads its settings from, and the request mix."""

    redis_server: Any
    client: Any
    env: dict[str, str]
    paths: list[str]
    folded: int

    def stop(self) -> None:
        self.client.close()
        self.redis_server.stop()


def build_live_state(
    root: Path, visitors: int = 2000, n_items: int = 50_000, n_users: int = 100_000, factors: int = 64,
    requests: int = 2000,
) -> LiveState:
    """Publish the synthetic model under `root`, start a private Redis, fold the visitors' browsing through
    the speed consumer; `stop()` it when done."""
    from common.redis_server import RedisServer, free_port

    redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
    redis_server.start()
    try:
        return _fill_live_state(root, redis_server, visitors, n_items, n_users, factors, requests)
    except BaseException:
        redis_server.stop()
        raise


def _fill_live_state(
    root: Path, redis_server: Any, visitors: int, n_items: int, n_users: int, factors: int, requests: int
) -> LiveState:
    from common.settings import Settings

    n_categories = 200
    registry, lake = Registry(str(root / "models")), Lake(str(root / "lake"))
    model = publish_synthetic_model(
        registry,
        lake,
        version="bench",
        n_items=n_items,
        n_users=n_users,
        factors=factors,
        n_categories=n_categories,
        n_new=50,
        seed=11,
        out_of_stock_every=BENCH_OUT_OF_STOCK_EVERY,
        promoted_every=BENCH_PROMOTED_EVERY,
    )
    env = {
        **os.environ,
        "RECS_VAR_DIR": str(root / "var"),
        "RECS_LAKE__ROOT": str(root / "lake"),
        "RECS_MODELS__ROOT": str(root / "models"),
        "RECS_REDIS__URL": redis_server.url,
    }
    settings = Settings(
        var_dir=root / "var",
        redis={"url": redis_server.url},  # type: ignore[arg-type]
        lake={"root": str(root / "lake")},  # type: ignore[arg-type]
        models={"root": str(root / "models")},  # type: ignore[arg-type]
    )
    people, events = browse(model, visitors // 2, visitors - visitors // 2, n_categories)
    client = redis_server.client()
    folded = fold_into_speed_state(client, settings, model.version, lake, events)
    return LiveState(redis_server, client, env, request_paths(people, requests), folded)


@dataclass(frozen=True)
class RealLake:
    """`--lake`: the state from a store's own events (bench/lake_state.py) instead of the synthetic model."""

    root: str
    days: int = 16  # folded through the speed layer; the model is trained on the days before
    models: Path | None = None  # keeps the trained version for the next run


def state_label(real: RealLake | None) -> str:
    return f"lake {real.root}, last {real.days} days" if real else "synthetic"


def bench_state(
    root: Path,
    real: RealLake | None,
    visitors: int = 2000,
    requests: int = 2000,
    n_items: int = 50_000,
    n_users: int = 100_000,
) -> LiveState:
    """The live state of a bench run: from `real`'s lake when given, else the synthetic model (`n_items`,
    `n_users`)."""
    if real is None:
        return build_live_state(root, visitors, n_items=n_items, n_users=n_users, requests=requests)
    from bench.lake_state import build_lake_state

    return build_lake_state(root, real.root, real.days, visitors, requests, real.models)


def bench_serve(
    base_rate: float = 200.0,
    seconds: float = 30.0,
    step_seconds: float = 6.0,
    max_rate: float = 20_000.0,
    workers: int = 2,
    visitors: int = 2000,
    real: RealLake | None = None,
) -> dict[str, Any]:
    from common.redis_server import free_port

    with tempfile.TemporaryDirectory(prefix="recs-bench-serve-") as tmp:
        live = bench_state(Path(tmp), real, visitors)
        env, paths, client, folded = live.env, live.paths, live.client, live.folded
        try:
            port = free_port()
            server = _start_server("serving.cli", workers, port, env)
            try:
                run_load(port, 50, 3, paths)  # warm-up: imports, first LightGBM calls, connections
                stages_before, cpu_before = _stage_seconds(port), _workers_cpu_s(server.pid)
                redis_before = _redis_cpu_s(client)
                base = run_load(port, base_rate, seconds, paths)
                cpu_s = _workers_cpu_s(server.pid) - cpu_before
                redis_cpu_s = _redis_cpu_s(client) - redis_before
                stages = _stage_ms(stages_before, _stage_seconds(port))
                start = base_rate * 1.5 if _keeps_up(base, base_rate) else base_rate / 1.5
                best, steps = highest_rate_under_50ms(port, paths, start, step_seconds, max_rate)
                # Twice that rate: what an overloaded worker's shedding (serving/core/load.py) keeps of the latency.
                overload = run_load(port, 2 * best, step_seconds, paths) if best else None
                rss = _workers_rss_mb(server.pid)
            finally:
                _stop_server(server)
            noop_port = free_port()
            noop = _start_server("bench.noop_app", workers, noop_port, env)
            try:
                noop_paths = ["/noop"]
                run_load(noop_port, 200, 2, noop_paths)
                # From well above the API's rate (the no-op's ceiling was ~4,500/s here): fewer steps.
                noop_best, noop_steps = highest_rate_under_50ms(
                    noop_port, noop_paths, max(best * 2, base_rate * 10), step_seconds, max_rate
                )
            finally:
                _stop_server(noop)
        finally:
            live.stop()
    return {
        "p50_ms": round(base["p50_ms"], 2),
        "p99_ms": round(base["p99_ms"], 2),
        "rps": round(base["rps"], 1),
        "errors": base["errors"],
        "max_rps_p99_under_50ms": round(best, 1),
        "shed": base["shed"],
        "overload": _overload_step(overload, 2 * best),
        "rss_mb": round(rss, 1),
        "noop_max_rps_p99_under_50ms": round(noop_best, 1),
        "ratio_to_noop": round(best / noop_best, 3) if noop_best else None,
        "cpu_ms_per_request": round(cpu_s / max(1, base["requests"]) * 1000, 3),
        "redis_cpu_ms_per_request": round(redis_cpu_s / max(1, base["requests"]) * 1000, 3),
        "stage_ms": stages,
        "steps": steps,
        "noop_steps": noop_steps,
        "speed_events_folded": folded,
        "state": state_label(real),
        "visitors": visitors,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
