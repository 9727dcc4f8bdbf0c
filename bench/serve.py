"""`recs bench serve`: the API (2 workers) on a medium synthetic model, driven at fixed rates by a separate process.

Prints one JSON object: p50/p99 latency and achieved rate at the base rate, errors, the highest
stepped rate whose p99 stays under 50 ms, and the API workers' resident memory. The synthetic
model factory here is also what the serving tests publish (small), so both run the same shapes.
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
from common.model import save_content_map, save_factors, save_ranker, save_table
from common.registry import COVISITATION, POPULARITY, Manifest, Registry


@dataclass(frozen=True)
class SyntheticModel:
    version: str
    item_ids: list[str]
    user_ids: list[str]
    categories: list[str]  # category of each item, aligned with item_ids
    new_items: list[str]  # created within the last day


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
) -> SyntheticModel:
    """Publish a version whose item factors cluster by category, with catalog, popularity, co-visits, ranker.

    User u leans to category u % n_categories; item j is in category j % n_categories; the last
    `n_new` items were created yesterday (new arrivals), the rest 90 days ago.
    """
    rng = np.random.default_rng(seed)
    centroids = rng.normal(0, 1, (n_categories, factors))
    item_cat = np.arange(n_items) % n_categories
    item_factors = (centroids[item_cat] + 0.35 * rng.normal(0, 1, (n_items, factors))) / np.sqrt(factors)
    user_cat = np.arange(n_users) % n_categories
    user_factors = (centroids[user_cat] + 0.35 * rng.normal(0, 1, (n_users, factors))) / np.sqrt(factors)
    item_ids = [f"i{j}" for j in range(n_items)]
    user_ids = [f"u{u}" for u in range(n_users)]
    save_factors(registry, version, user_ids, user_factors, item_ids, item_factors)

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
    if with_ranker:
        save_ranker(registry, version, train_toy_ranker(seed))
    # The catalog's content below, so items added later get content vectors (common/content.py).
    contents = [ItemContent(f"Item {j}", ("Root", item_category(j, n_categories)), "", float(10 + j % 50)) for j in range(n_items)]
    save_content_map(registry, version, fit_content_map(contents, item_factors))

    now = datetime.now(UTC)
    cutoff = now - timedelta(hours=1)
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


# ---------------------------------------------------------------- the load process


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _drive(
    port: int, rate: float, seconds: float, paths: list[str], connections: int
) -> dict[str, Any]:
    """Open-loop load: request i is due at i/rate; latency counts from when it was due (no coordinated omission)."""
    due_queue: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while True:
            job = await due_queue.get()
            if job is None:
                break
            due, path = job
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                await writer.drain()
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if b" 200 " not in status_line:
                    errors += 1
                latencies.append((time.perf_counter() - due) * 1000)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        due_queue.put_nowait((due, random.choice(paths)))
    for _ in workers:
        due_queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "rps": len(latencies) / elapsed,
        "errors": errors,
    }


def _load_process(port: int, rate: float, seconds: float, paths: list[str], out: Any) -> None:
    out.put(asyncio.run(_drive(port, rate, seconds, paths, connections=64)))


def run_load(port: int, rate: float, seconds: float, paths: list[str]) -> dict[str, Any]:
    """Run one load step in a separate process (so the client does not share the API's interpreter)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(port, rate, seconds, paths, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return dict(result)


def request_paths(model: SyntheticModel, n: int = 2000, seed: int = 1) -> list[str]:
    """A mix: known users, anonymous devices, product pages."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        kind = i % 4
        if kind in (0, 1):
            paths.append(f"/v1/recommendations?user_id={rng.choice(model.user_ids)}&k=10")
        elif kind == 2:
            paths.append(f"/v1/recommendations?anonymous_id=anon-{rng.randrange(10**6)}&k=10")
        else:
            item = rng.choice(model.item_ids)
            paths.append(
                f"/v1/recommendations?user_id={rng.choice(model.user_ids)}&context=product&item_id={item}&k=10"
            )
    return paths


def _wait_ready(port: int, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the API did not become ready on port {port}")


def _workers_rss_mb(server_pid: int) -> float:
    """Largest resident set among the uvicorn worker processes (children of the server)."""
    import psutil

    parent = psutil.Process(server_pid)
    children = parent.children(recursive=True)
    rss = [c.memory_info().rss for c in children] or [parent.memory_info().rss]
    return max(rss) / 2**20


def _keeps_up(step: dict[str, Any], rate: float) -> bool:
    return bool(step["p99_ms"] <= 50 and step["errors"] == 0 and step["rps"] >= 0.95 * rate)


def _highest_rate_under_50ms(
    port: int, paths: list[str], base_rate: float, base: dict[str, Any], step_seconds: float, max_rate: float
) -> float:
    """Step the rate up by 1.5x from the base while p99 <= 50 ms, or down from it until it holds."""
    if _keeps_up(base, base_rate):
        best = rate = base_rate
        while rate < max_rate:
            rate *= 1.5
            if not _keeps_up(run_load(port, rate, step_seconds, paths), rate):
                break
            best = rate
        return best
    rate = base_rate
    while rate > 10:
        rate /= 1.5
        if _keeps_up(run_load(port, rate, step_seconds, paths), rate):
            return rate
    return 0.0


def bench_serve(
    n_items: int = 50_000,
    n_users: int = 100_000,
    factors: int = 64,
    base_rate: float = 200.0,
    seconds: float = 30.0,
    step_seconds: float = 10.0,
    max_rate: float = 2000.0,
    workers: int = 2,
) -> dict[str, Any]:
    from common.redis_server import RedisServer, free_port

    with tempfile.TemporaryDirectory(prefix="recs-bench-serve-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        redis_server.start()
        registry, lake = Registry(str(root / "models")), Lake(str(root / "lake"))
        model = publish_synthetic_model(
            registry,
            lake,
            version="bench",
            n_items=n_items,
            n_users=n_users,
            factors=factors,
            n_categories=200,
            n_new=50,
            seed=11,
        )
        port = free_port()
        env = {
            **os.environ,
            "RECS_VAR_DIR": str(root / "var"),
            "RECS_LAKE__ROOT": str(root / "lake"),
            "RECS_MODELS__ROOT": str(root / "models"),
            "RECS_REDIS__URL": redis_server.url,
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "--workers", str(workers), "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_ready(port)
            paths = request_paths(model)
            run_load(port, 50, 3, paths)  # warm-up: imports, first LightGBM calls, connections
            base = run_load(port, base_rate, seconds, paths)
            best = _highest_rate_under_50ms(port, paths, base_rate, base, step_seconds, max_rate)
            rss = _workers_rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
            redis_server.stop()
    return {
        "p50_ms": round(base["p50_ms"], 2),
        "p99_ms": round(base["p99_ms"], 2),
        "rps": round(base["rps"], 1),
        "errors": base["errors"],
        "max_rps_p99_under_50ms": round(best, 1),
        "rss_mb": round(rss, 1),
    }
