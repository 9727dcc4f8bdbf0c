"""`recs bench ingest`: POST /v1/events as storefront trackers send it, on `recs serve`'s server (2 workers)
and a private Redis: open-loop load from another process (bench/serve.py's), bodies of a few events of one
device's session each, as tracker.js batches them. Reports, per checkout: latency at a base rate, the
workers' and Redis' CPU a POST there, and the highest rate whose p99 stays <= 50 ms; beside it, a no-op
POST route on the same server settings and load process (`ratio_to_noop`).

With `against` (another checkout, e.g. a worktree of main), each round runs both servers on the same
load, one after the other, the order alternated, so the two are compared side by side in one run.

`in_process` (`--in-process`) instead posts the same bodies through the whole ASGI app in one process, no
sockets, each checkout in a fresh process per round (this file as a script under that checkout's code):
the app's own CPU a POST and Redis' beside it, steadier than a server's figures on a busy machine.

The stream's consumer group exists but nothing consumes it: the API's cost alone is measured, so the
backpressure limit is lifted, and the stream is emptied before each server starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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
from bench.serve_profile import alternating
from common import redis_keys
from common.lake import Lake
from common.registry import Registry

HERE = Path(__file__).resolve()
THIS_TREE = HERE.parents[1]
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


def _server_env(root: Path, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "RECS_VAR_DIR": str(root / "var"),
        "RECS_LAKE__ROOT": str(root / "lake"),
        "RECS_MODELS__ROOT": str(root / "models"),
        "RECS_REDIS__URL": redis_url,
        "RECS_API__MAX_STREAM_LAG": str(10**9),  # nothing consumes: the API's own cost is measured
    }


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
        try:
            # A served version, as in production: the API is ready only with one (a POST does not read it).
            publish_synthetic_model(Registry(str(root / "models")), Lake(str(root / "lake")), version="ingest")
            env = _server_env(root, redis_server.url)
            stream, group = redis_keys.stream(Settings().redis.stream), Settings().speed.group
            runs: dict[Path, list[dict[str, Any]]] = {tree: [] for tree in trees}
            for r in range(rounds):
                for tree in alternating(trees, r):
                    client.delete(stream)
                    client.xgroup_create(stream, group, id="$", mkstream=True)
                    runs[tree].append(
                        _measure(tree, env, requests, client, workers, seconds, base_rate, step_seconds, max_rate)
                    )
            best = max(run["max_posts_per_s_p99_under_50ms"] for done in runs.values() for run in done)
            # The no-op's own ceiling is the load process's (~13k/s here): stepped without the API's cap.
            noop_best, noop_steps = _noop_ceiling(
                env, bodies, workers, max(best * 2, base_rate * 4), step_seconds, 10 * max_rate
            )
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


def bench_ingest_in_process(
    against: Path | None = None, rounds: int = 3, passes: int = 5, posts: int = 3000, events_per_post: int = 2
) -> dict[str, Any]:
    """`rounds` rounds of this checkout's app and `against`'s, each in a fresh process posting the same
    bodies, the order swapped every round; each child's median pass, and the rounds' ratios."""
    from common.redis_server import RedisServer, free_port

    trees = {"this": THIS_TREE, **({"against": against.resolve()} if against is not None else {})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="recs-bench-ingest-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        redis_server.start()
        try:
            publish_synthetic_model(Registry(str(root / "models")), Lake(str(root / "lake")), version="ingest")
            env = _server_env(root, redis_server.url)
            job = root / "job.json"
            job.write_text(json.dumps({"bodies": [b.decode() for b in tracker_bodies(posts, events_per_post)],
                                       "passes": passes}))  # fmt: skip
            for r in range(rounds):
                for name, tree in alternating(list(trees.items()), r):
                    out = root / f"{name}-{r}.json"
                    child_env = {**env, "PYTHONPATH": str(tree)}
                    command = [sys.executable, str(HERE), str(job), str(out)]
                    subprocess.run(command, env=child_env, check=True, cwd=tree)
                    runs[name].append(json.loads(out.read_text()))
        finally:
            redis_server.stop()
    result: dict[str, Any] = {
        "posts": posts, "events_per_post": events_per_post, "load_avg_1m": round(os.getloadavg()[0], 2)
    }
    for name, outs in runs.items():
        result[name] = {
            "tree": str(trees[name]),
            "app_us_per_post": round(statistics.median(o["app_us_per_post"] for o in outs), 1),
            "app_us_rounds": [o["app_us_per_post"] for o in outs],
            "redis_us_per_post": round(statistics.median(o["redis_us_per_post"] for o in outs), 1),
            "redis_us_rounds": [o["redis_us_per_post"] for o in outs],
            "redis_commands_per_post": outs[len(outs) // 2]["redis_commands_per_post"],
        }
    if against is not None:
        for figure in ("app_us", "redis_us"):
            pairs = zip(runs["this"], runs["against"], strict=True)
            ratios = [ours[f"{figure}_per_post"] / theirs[f"{figure}_per_post"] for ours, theirs in pairs]
            result[f"{figure}_ratio_rounds"] = [round(v, 3) for v in ratios]
            result[f"{figure}_ratio_median_of_rounds"] = round(statistics.median(ratios), 3)
    return result


def run_posts(bodies: list[bytes], passes: int) -> dict[str, Any]:
    """In this process: start the app (its lifespan reads the environment's settings), post every body once
    to warm up, then `passes` timed passes; the app's CPU µs a POST (median pass), Redis' CPU µs and
    commands a POST over those passes."""
    return asyncio.run(_run_posts(bodies, passes))


async def _run_posts(bodies: list[bytes], passes: int) -> dict[str, Any]:
    from serving.main import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        state = app.state.serving
        state._stop.set()  # the background refreshes would add their own CPU and commands
        for thread in state._threads:
            thread.join(timeout=10)
        client = state.redis.client
        for body in bodies:
            status = await _asgi_post(app, body)
            assert status == 202, status
        client.config_resetstat()
        redis_before = _redis_cpu_s(client)
        cpu_us = []
        for _ in range(passes):
            start = time.process_time()
            for body in bodies:
                await _asgi_post(app, body)
            cpu_us.append((time.process_time() - start) * 1e6 / len(bodies))
        redis_s = _redis_cpu_s(client) - redis_before
        stats = client.info("commandstats")
    timed = passes * len(bodies)
    not_timed = ("cmdstat_info", "cmdstat_config|resetstat")
    commands = sum(int(v["calls"]) for k, v in stats.items() if k not in not_timed)
    return {
        "app_us_per_post": round(statistics.median(cpu_us), 1),
        "redis_us_per_post": round(redis_s * 1e6 / timed, 1),
        "redis_commands_per_post": round(commands / timed, 3),
    }


async def _asgi_post(app: Any, body: bytes) -> int:
    """POST `body` to /v1/events through the ASGI app as uvicorn would hand it over; the response's status."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/events", "raw_path": b"/v1/events", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    statuses: list[int] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:  # the app reads the body once; a second read would wait for a disconnect
            await asyncio.Event().wait()
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


if __name__ == "__main__":
    # Child: `python bench/ingest.py JOB OUT`, the checkout under test first on PYTHONPATH (not this
    # file's folder, whose modules would shadow top-level names).
    sys.path[0] = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    spec = json.loads(Path(sys.argv[1]).read_text())
    answer = run_posts([body.encode() for body in spec["bodies"]], spec["passes"])
    Path(sys.argv[2]).write_text(json.dumps(answer))
