"""Soak: the whole write path as real processes under a steady load, sampled every minute for growth.

Starts its own redis-server (the embedded one, with its maxmemory), the speed consumers, the lake
writer and the API (1 worker) on a synthetic model, and posts ~200 events/s through the API over a
population of users and devices (and a few recommendation requests). Each sample records Redis
used_memory, DBSIZE, the stream's length, memory per key family and each process's RSS; the report
gives growth per minute over the last half of the run. Every TTL is shortened to the stated horizon
(at most 40% of the run) through settings, so the last half runs in steady state; the stream is not:
its retention (48 h at least) is longer than any soak, so it grows by design and its memory is
reported apart.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.serve import _wait_ready, browse, publish_synthetic_model, request_paths
from common import redis_keys
from common.key_memory import keyspace_usage
from common.lake import Lake
from common.redis_server import RedisServer, free_port
from common.registry import Registry
from common.settings import RedisSettings

TICK_S = 0.1
N_CATEGORIES = 50


def run_soak(
    minutes: float,
    rate: float = 200.0,
    users: int = 5000,
    devices: int = 20_000,
    consumers: int = 1,
    sample_s: float = 60.0,
    seed: int = 0,
) -> dict[str, Any]:
    horizon_s = max(60, int(minutes * 60 * 0.4))
    with tempfile.TemporaryDirectory(prefix="recs-bench-soak-") as tmp:
        root = Path(tmp)
        budget = RedisSettings().max_memory_mb * 2**20
        server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False, max_memory_bytes=budget)
        server.start()
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            model = publish_synthetic_model(
                Registry(str(root / "models")), Lake(str(root / "lake")), version="soak",
                n_items=5000, n_users=users, factors=32, n_categories=N_CATEGORIES, seed=seed,
            )  # fmt: skip
            port = free_port()
            env = _env(root, server.url, horizon_s)
            recs = [sys.executable, "-c", "from recs.main import app; app()"]
            commands = {
                "speed": [*recs, "speed", "run", "--consumers", str(consumers)],
                "lake_writer": [*recs, "lake-writer", "run"],
                "api": [*recs, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            }
            for role, command in commands.items():
                processes[role] = subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
                )
            _wait_ready(port)
            samples, load = _drive(server, processes, port, model, rate, users, devices, minutes, sample_s, seed)
        finally:
            for process in processes.values():
                _stop_group(process)
            server.stop()
    return _report(samples, load, minutes, rate, horizon_s, users, devices, consumers)


def _env(root: Path, url: str, horizon_s: int) -> dict[str, str]:
    """The processes' settings: this run's places, and every TTL shortened to the horizon."""
    ttl = str(horizon_s)
    return {
        **os.environ,
        "RECS_VAR_DIR": str(root / "var"),
        "RECS_LAKE__ROOT": str(root / "lake"),
        "RECS_MODELS__ROOT": str(root / "models"),
        "RECS_REDIS__URL": url,
        "RECS_API__WORKERS": "1",
        "RECS_SPEED__SESSION_TTL_S": ttl,
        "RECS_SPEED__DEDUP_TTL_S": ttl,
        "RECS_SPEED__HISTORY_TTL_S": ttl,
        "RECS_SPEED__NEIGHBOUR_SESSION_TTL_S": ttl,
        "RECS_SPEED__TRENDING_WINDOW_S": ttl,
        "RECS_SPEED__TRENDING_BUCKET_S": str(max(10, horizon_s // 6)),
        "RECS_LAKE__DEDUP_WINDOW_S": ttl,  # the lake writer holds the window's event ids
    }


def _drive(
    server: RedisServer,
    processes: dict[str, subprocess.Popen[bytes]],
    port: int,
    model: Any,
    rate: float,
    users: int,
    devices: int,
    minutes: float,
    sample_s: float,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Post events at `rate` for `minutes`, sampling every `sample_s`; returns the samples and the load's counts."""
    rng = random.Random(seed)
    paths = request_paths(browse(model, 50, 50, N_CATEGORIES, seed=seed)[0])  # the serve bench's mix
    client = server.client()
    load = {"events_sent": 0, "events_refused": 0, "rec_requests": 0, "rec_errors": 0}
    per_tick = max(1, round(rate * TICK_S))
    sessions: dict[str, str] = {}  # device -> its live session
    started = time.monotonic()
    samples = [_sample(client, processes, 0.0)]
    next_sample = started + sample_s
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        tick = 0
        while time.monotonic() - started < minutes * 60:
            events = [_event(rng, sessions, users, devices, model.item_ids) for _ in range(per_tick)]
            response = http.post("/v1/events", json=events)
            load["events_sent" if response.is_success else "events_refused"] += len(events)
            if tick % 10 == 0:  # 1 request/s per 10 ticks of events: the API's read path stays warm
                load["rec_requests"] += 1
                load["rec_errors"] += http.get(paths[tick // 10 % len(paths)]).status_code != 200
            tick += 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append(_sample(client, processes, (now - started) / 60))
                next_sample += sample_s
            time.sleep(max(0.0, started + tick * TICK_S - time.monotonic()))
    samples.append(_sample(client, processes, (time.monotonic() - started) / 60))
    return samples, load


def _event(rng: random.Random, sessions: dict[str, str], users: int, devices: int, items: list[str]) -> dict[str, Any]:
    """A storefront event: a device of the population (a third of them signed in as a user), in its
    live session, which ends one time in ten."""
    n = rng.randrange(devices)
    device = f"dev{n}"
    if device not in sessions or rng.random() < 0.1:
        sessions[device] = uuid.uuid4().hex[:12]
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": rng.choice(["view"] * 14 + ["click"] * 3 + ["add_to_cart"] * 2 + ["purchase"]),
        "ts": datetime.now(UTC).isoformat(),
        "anonymous_id": device,
        "session_id": sessions[device],
        "item_id": items[min(len(items) - 1, int(rng.paretovariate(1.2)) - 1)],
    }
    if n % 3 == 0:
        event["user_id"] = f"u{n % users}"
    return event


def _sample(client: Any, processes: dict[str, subprocess.Popen[bytes]], minute: float) -> dict[str, Any]:
    memory = client.info("memory")
    # A pass long enough to go round the keyspace: a cut one can miss the few-key families.
    usage = keyspace_usage(client, budget_s=30.0)
    stream_key = redis_keys.stream(RedisSettings().stream)
    stream_bytes = int(client.memory_usage(stream_key, samples=0) or 0)  # exact: the largest key
    return {
        "minute": round(minute, 2),
        "redis_used_memory": int(memory["used_memory"]),
        "redis_memory_without_stream": int(memory["used_memory"]) - stream_bytes,
        "stream_bytes": stream_bytes,
        "families_bytes_without_stream": sum(f.bytes for name, f in usage.families.items() if name != "stream"),
        "keys": int(client.dbsize()),
        "stream_length": int(client.xlen(stream_key)),
        "keyspace_pass_complete": usage.complete,
        "rss_mb": {role: round(_tree_rss(p.pid) / 2**20, 1) for role, p in processes.items()},
        "families_bytes": {name: f.bytes for name, f in usage.families.items() if f.keys},
        "families_keys": {name: f.keys for name, f in usage.families.items() if f.keys},
    }


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (the supervisor's consumers, uvicorn's workers)."""
    try:
        parent = psutil.Process(pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in tree:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def _per_minute(samples: list[dict[str, Any]], value: Any) -> float:
    """Growth per minute from the sample at the run's half to the last one."""
    last = samples[-1]
    middle = min(samples, key=lambda s: abs(s["minute"] - last["minute"] / 2))
    span = last["minute"] - middle["minute"]
    return round((value(last) - value(middle)) / span, 1) if span > 0 else float("nan")


def _report(
    samples: list[dict[str, Any]],
    load: dict[str, int],
    minutes: float,
    rate: float,
    horizon_s: int,
    users: int,
    devices: int,
    consumers: int,
) -> dict[str, Any]:
    growth: dict[str, Any] = {
        name: _per_minute(samples, lambda s, name=name: s[name])
        for name in (
            "redis_used_memory", "redis_memory_without_stream", "families_bytes_without_stream", "stream_bytes",
            "keys", "stream_length",
        )
    }
    growth["rss_mb"] = {
        role: _per_minute(samples, lambda s, role=role: s["rss_mb"][role]) for role in samples[0]["rss_mb"]
    }
    return {
        "minutes": minutes,
        "offered_events_per_s": rate,
        **load,
        "users": users,
        "devices": devices,
        "speed_consumers": consumers,
        "ttl_horizon_s": horizon_s,
        "ttl_note": "every speed TTL (session, dedup, history, neighbour sessions, trending window) and the lake "
        "writer's dedup window set to ttl_horizon_s for this run; the stream keeps its retention (>= 48 h) and grows",
        "growth_per_minute_over_last_half": growth,
        "samples": samples,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process and its group (uvicorn's workers, the consumers), then wait."""
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
