"""`recs bench ingest`: POST /v1/events as storefront trackers send it, on `recs serve`'s server (2 workers)
and a private Redis: open-loop load from another process (bench/serve.py's), bodies of a few events of one
device's session each, as tracker.js batches them. Reports, per checkout: latency at a base rate, the
workers' and Redis' CPU a POST there, and the highest rate whose p99 stays <= 50 ms; beside it, a no-op
POST route on the same server settings and load process (`ratio_to_noop`).

With `against` (another checkout, e.g. a worktree of main), each round runs both servers on the same
load, one after the other, the order alternated, so the two are compared side by side in one run.

The stream's consumer group exists but nothing consumes it: the API's cost alone is measured, so the
backpressure limit is lifted, and the stream is emptied before each server starts.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.serve import (
    _keeps_up,
    _redis_cpu_s,
    _start_server,
    _stop_server,
    _workers_cpu_s,
    highest_rate_under_50ms,
    publish_synthetic_model,
    run_load,
)
from common import redis_keys
from common.lake import Lake
from common.registry import Registry

THIS_TREE = Path(__file__).resolve().parents[1]
TYPES = ["view"] * 6 + ["click", "add_to_cart"]


def tracker_bodies(n: int, events_per_post: int, seed: int = 0) -> list[bytes]:
    """`n` POST bodies: each a JSON array of `events_per_post` events of one device's session, each event
    with its own id (the API does not deduplicate, but a real body never repeats one)."""
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    bodies = []
    for b in range(n):
        device, session = f"dev-{b % 5000}", f"s-{b % 5000}-{b // 5000}"
        events = [
            {
                "event_id": str(uuid.UUID(int=int(rng.integers(2**62)) << 64 | b * 64 + i, version=4)),
                "event_type": TYPES[int(rng.integers(len(TYPES)))],
                "ts": now,
                "anonymous_id": device,
                "session_id": session,
                "item_id": f"i{int(rng.zipf(1.3)) % 50_000}",
                "context": {"page": "/p", "device": "mobile"},
            }
            for i in range(events_per_post)
        ]
        bodies.append(json.dumps(events).encode())
    return bodies


def post_request(path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def bench_ingest(
    seconds: float = 20.0,
    base_rate: float = 500.0,
    events_per_post: int = 2,
    workers: int = 2,
    against: Path | None = None,
    rounds: int = 1,
    step_seconds: float = 6.0,
    max_rate: float = 20_000.0,
) -> dict[str, Any]:
    from common.redis_server import RedisServer, free_port
    from common.settings import Settings

    trees = [THIS_TREE] + ([against.resolve()] if against is not None else [])
    bodies = tracker_bodies(20_000, events_per_post)
    requests = [post_request("/v1/events", body) for body in bodies]
    with tempfile.TemporaryDirectory(prefix="recs-bench-ingest-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        redis_server.start()
        client = redis_server.client()
        # A served version, as in production: the API is ready only with one (POST /v1/events does not read it).
        publish_synthetic_model(Registry(str(root / "models")), Lake(str(root / "lake")), version="ingest")
        env = {
            **os.environ,
            "RECS_VAR_DIR": str(root / "var"),
            "RECS_LAKE__ROOT": str(root / "lake"),
            "RECS_MODELS__ROOT": str(root / "models"),
            "RECS_REDIS__URL": redis_server.url,
            "RECS_API__MAX_STREAM_LAG": str(10**9),  # nothing consumes: the API's own cost is measured
        }
        stream, group = redis_keys.stream(Settings().redis.stream), Settings().speed.group
        try:
            runs: dict[Path, list[dict[str, Any]]] = {tree: [] for tree in trees}
            for r in range(rounds):
                for tree in trees if r % 2 == 0 else trees[::-1]:
                    client.delete(stream)
                    client.xgroup_create(stream, group, id="$", mkstream=True)
                    runs[tree].append(
                        _measure(tree, env, requests, client, workers, seconds, base_rate, step_seconds, max_rate)
                    )
            best = max(run["max_posts_per_s_p99_under_50ms"] for tree_runs in runs.values() for run in tree_runs)
            noop_best, noop_steps = _noop_ceiling(env, bodies, workers, max(best * 2, base_rate * 4), step_seconds, max_rate)
        finally:
            client.close()
            redis_server.stop()
    this = _summary(runs[THIS_TREE], noop_best)
    out: dict[str, Any] = {
        **this,
        "events_per_post": events_per_post,
        "noop_max_posts_per_s_p99_under_50ms": round(noop_best, 1),
        "noop_steps": noop_steps,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if against is not None:
        other = _summary(runs[trees[1]], noop_best)
        out["against"] = {"tree": str(trees[1]), **other}
        out["cpu_ratio_per_round"] = [
            round(a["cpu_ms_per_post"] / b["cpu_ms_per_post"], 3)
            for a, b in zip(runs[THIS_TREE], runs[trees[1]], strict=True)
        ]
    return out


def _measure(
    tree: Path, env: dict[str, str], requests: list[bytes], client: Any, workers: int, seconds: float,
    base_rate: float, step_seconds: float, max_rate: float,
) -> dict[str, Any]:  # fmt: skip
    """One checkout's server: the base rate's latency and CPU a POST, then the highest rate held."""
    from common.redis_server import free_port

    port = free_port()
    server = _start_server("serving.cli", workers, port, env, tree=tree)
    try:
        run_load(port, 50, 2, requests)  # warm-up: imports, connections
        cpu_before, redis_before = _workers_cpu_s(server.pid), _redis_cpu_s(client)
        base = run_load(port, base_rate, seconds, requests)
        cpu_s, redis_s = _workers_cpu_s(server.pid) - cpu_before, _redis_cpu_s(client) - redis_before
        start = base_rate * 1.5 if _keeps_up(base, base_rate) else base_rate / 1.5
        best, steps = highest_rate_under_50ms(port, requests, start, step_seconds, max_rate)
    finally:
        _stop_server(server)
    posts = max(1, base["requests"])
    return {
        "p50_ms": round(base["p50_ms"], 2),
        "p99_ms": round(base["p99_ms"], 2),
        "posts_per_s": round(base["rps"], 1),
        "errors": base["errors"],
        "cpu_ms_per_post": round(cpu_s / posts * 1000, 3),
        "redis_cpu_ms_per_post": round(redis_s / posts * 1000, 3),
        "max_posts_per_s_p99_under_50ms": round(best, 1),
        "steps": steps,
    }


def _noop_ceiling(
    env: dict[str, str], bodies: list[bytes], workers: int, start: float, step_seconds: float, max_rate: float
) -> tuple[float, list[dict[str, Any]]]:
    from common.redis_server import free_port

    port = free_port()
    noop = _start_server("bench.noop_app", workers, port, env)
    try:
        requests = [post_request("/noop", body) for body in bodies]
        run_load(port, 200, 2, requests)
        return highest_rate_under_50ms(port, requests, start, step_seconds, max_rate)
    finally:
        _stop_server(noop)


def _summary(runs: list[dict[str, Any]], noop_best: float) -> dict[str, Any]:
    """The median run's figures (by the highest rate held), every run's headline figures listed."""
    median = sorted(runs, key=lambda run: run["max_posts_per_s_p99_under_50ms"])[len(runs) // 2]
    return {
        **median,
        "ratio_to_noop": round(median["max_posts_per_s_p99_under_50ms"] / noop_best, 3) if noop_best else None,
        "cpu_ms_per_post_runs": [run["cpu_ms_per_post"] for run in runs],
        "redis_cpu_ms_per_post_runs": [run["redis_cpu_ms_per_post"] for run in runs],
        "max_posts_per_s_runs": [run["max_posts_per_s_p99_under_50ms"] for run in runs],
        "cpu_ms_per_post_median": statistics.median(run["cpu_ms_per_post"] for run in runs),
    }
