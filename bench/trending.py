"""Trending's re-sum, side by side: one ZUNIONSTORE of the window's buckets (what the consumer ran before
session 39) against speed_layer/trending.py's copy, which reads the buckets counted since.

A window of 72 buckets, each with `items` of 50,000 items; between passes the newest bucket gets 500
events, counted as the speed layer's scripts count them. Per pass: the longest command Redis ran
(SLOWLOG: what every other client waited behind at worst), Redis' CPU, the caller's CPU and the wall
time. The first pass (a consumer's first re-sum reads every bucket) is reported apart.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from common import redis_keys
from common.redis_server import RedisServer, free_port
from speed_layer.trending import Refreshed, TrendingSum

WINDOW = 72
CATALOG = 50_000
NEW_EVENTS = 500  # counted in the newest bucket between passes
TOP_N = 500


def bench_trending(items: tuple[int, ...] = (500, 2000, 5000), passes: int = 6) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recs-bench-trending-") as tmp:
        server = RedisServer(data_dir=Path(tmp), port=free_port(), persist=False)
        server.start()
        try:
            client = server.client()
            client.config_set("slowlog-log-slower-than", 0)
            client.config_set("slowlog-max-len", 100_000)
            by_size = {str(n): _one_size(client, n, passes) for n in items}
        finally:
            server.stop()
    return {
        "buckets": WINDOW,
        "catalog": CATALOG,
        "new_events_a_pass": NEW_EVENTS,
        "top_n": TOP_N,
        "items": by_size,
    }


def _one_size(client: redis.Redis, items: int, passes: int) -> dict[str, Any]:
    client.flushall()
    rng = np.random.default_rng(0)
    weights = {redis_keys.trending_bucket(1_800_000_000 - 300 * i): 0.5 ** (i / 12) for i in range(WINDOW)}
    for key in weights:
        chosen = rng.choice(CATALOG, items, replace=False)
        client.zadd(key, {f"i{j}": float(rng.integers(1, 20)) for j in chosen.tolist()})
        client.zincrby(redis_keys.TRENDING_VERSIONS, items, key)
    trending = TrendingSum()
    sides: dict[str, Callable[[], object]] = {
        "union": lambda: _union(client, weights, redis_keys.TRENDING_TOP),
        "copy": lambda: trending.refresh(client, weights, TOP_N),
    }
    out: dict[str, Any] = {}
    for name, resum in sides.items():
        runs = []
        for first in [True] + [False] * (passes - 1):
            if not first:
                _count_new_events(client, rng, next(iter(weights)))
            runs.append(_timed(client, resum))
        steady = {field: round(statistics.median(run[field] for run in runs[1:]), 2) for field in runs[0]}
        out[name] = {"first": runs[0], "steady_median": steady}
    out["identical"] = _kept(client, redis_keys.TRENDING_TOP) == _kept(
        client, _union(client, weights, "expected")
    )
    out["longest_ratio"] = round(
        out["copy"]["steady_median"]["longest_ms"] / out["union"]["steady_median"]["longest_ms"], 3
    )
    return out


def _union(client: redis.Redis, weights: dict[str, float], into: str) -> str:
    pipe = client.pipeline(transaction=True)
    pipe.zunionstore(into, weights)
    pipe.zremrangebyrank(into, 0, -(TOP_N + 1))
    pipe.execute()
    return into


def _count_new_events(client: redis.Redis, rng: np.random.Generator, bucket: str) -> None:
    for j in rng.choice(CATALOG, NEW_EVENTS, replace=False).tolist():
        client.zincrby(bucket, 1.0, f"i{j}")
    client.zincrby(redis_keys.TRENDING_VERSIONS, NEW_EVENTS, bucket)


def _timed(client: redis.Redis, resum: Callable[[], object]) -> dict[str, float]:
    client.slowlog_reset()
    redis_before, cpu_before, wall_before = _redis_cpu_s(client), time.process_time(), time.perf_counter()
    done = resum()
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    redis_cpu = _redis_cpu_s(client) - redis_before
    longest_us = max((entry["duration"] for entry in client.slowlog_get(100_000)), default=0)
    return {
        "longest_ms": round(longest_us / 1000, 3),
        "redis_cpu_ms": round(redis_cpu * 1000, 2),
        "caller_cpu_ms": round(cpu * 1000, 2),
        "wall_ms": round(wall * 1000, 2),
        "buckets_read": done.read if isinstance(done, Refreshed) else WINDOW,  # the union reads them all
    }


def _redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _kept(client: redis.Redis, key: str) -> list[Any]:
    return list(client.zrange(key, 0, -1, withscores=True))
