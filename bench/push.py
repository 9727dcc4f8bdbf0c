"""`recs bench push`: live pushes at scale. The API (2 workers), a speed consumer and redis-server, all real.

N SSE streams are opened for N anonymous sessions, and events for those sessions are posted
through the API at a fixed rate (round robin: each session gets one every N / rate seconds); a
push is delivered when the session's stream receives a list after its event was posted. GET
/v1/recommendations latency is measured by the serve benchmark's load process in the same run,
first with the events but no stream open, then with the streams open: the ratio is what the
streams cost the request path.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench.serve import (
    BENCH_OUT_OF_STOCK_EVERY,
    BENCH_PROMOTED_EVERY,
    _redis_cpu_s,
    _stage_ms,
    _stage_seconds,
    _wait_ready,
    publish_synthetic_model,
    run_load,
)
from bench.soak import _stop_group
from common.lake import Lake
from common.redis_server import RedisServer, free_port
from common.registry import Registry

DELIVERY_TARGET_S = 1.0
GRACE_S = 3.0  # after the last event, for its list to arrive
HELPER_START_S = 60.0  # a bound on the workers' push helpers getting ready (each loads the model)
EVENT_CONNECTIONS = 16
# The workers' push counters read from /metrics (summed over workers) around the two phases.
PUSH_COUNTERS = (
    "recs_push_computations_total",
    "recs_pushed_lists_total",
    "recs_push_unchanged_total",
    "recs_push_coalesced_total",
    "recs_push_dropped_total",
)


def session_of(n: int) -> tuple[str, str]:
    """The device and session of the bench's n-th stream."""
    return f"dev-{n}", f"sess-{n}"


@dataclass
class PushClient:
    """The streams' and the events' side of a phase, run in its own process."""

    port: int
    sessions: int
    open_streams: bool
    rate: float
    seconds: float
    items: list[str]
    posted: dict[int, list[float]] = field(default_factory=dict)  # session -> times its events were posted
    arrived: dict[int, list[float]] = field(default_factory=dict)  # session -> times lists arrived
    post_errors: int = 0
    stream_errors: int = 0

    async def run(self, ready: Any, go: Any) -> dict[str, Any]:
        streams = []
        if self.open_streams:
            opened = [asyncio.Event() for _ in range(self.sessions)]
            streams = [asyncio.create_task(self._stream(n, opened[n])) for n in range(self.sessions)]
            for event in opened:  # each stream's first list (or its end) has arrived
                await asyncio.wait_for(event.wait(), 120)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        sent_from = time.perf_counter()
        await self._post_events()
        await asyncio.sleep(GRACE_S if self.open_streams else 0)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        return {**self._report(sent_from), "client_cpu_s": time.process_time()}  # the whole process

    async def _stream(self, n: int, opened: asyncio.Event) -> None:
        """One SSE client: records the arrival time of each `recommendations` event after the first."""
        device, session = session_of(n)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**20)
        path = f"/v1/stream/recommendations?anonymous_id={device}&session_id={session}&k=10"
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
        await writer.drain()
        arrived = self.arrived.setdefault(n, [])
        try:
            # Chunked: each event is one chunk, whose size line precedes its `event:` line.
            while line := await reader.readline():
                if line.startswith(b"event: recommendations"):
                    if opened.is_set():
                        arrived.append(time.perf_counter())
                    opened.set()
                elif line.startswith(b"event: error"):  # the stream ends (Redis lost)
                    self.stream_errors += 1
                    opened.set()
                    return
        finally:
            writer.close()

    async def _post_events(self) -> None:
        """Open-loop: event i is due at i / rate, for session i mod N; its time is when it was due."""
        due_queue: asyncio.Queue[tuple[float, int] | None] = asyncio.Queue()
        rng = random.Random(7)

        async def poster() -> None:
            # Plain HTTP/1.1 on a kept-alive connection: the client's own CPU stays small beside the API's.
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            while (job := await due_queue.get()) is not None:
                due, n = job
                self.posted.setdefault(n, []).append(due)
                body = json.dumps(_event(n, rng.choice(self.items))).encode()
                writer.write(
                    b"POST /v1/events HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                self.post_errors += await _read_response(reader) != 202
            writer.close()

        posters = [asyncio.create_task(poster()) for _ in range(EVENT_CONNECTIONS)]
        start = time.perf_counter()
        for i in range(int(self.rate * self.seconds)):
            due = start + i / self.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            due_queue.put_nowait((due, i % self.sessions))
        for _ in posters:
            due_queue.put_nowait(None)
        await asyncio.gather(*posters)

    def _report(self, sent_from: float) -> dict[str, Any]:
        """Each event is delivered by the first list of its session that arrives after it was posted."""
        latencies: list[float] = []
        for n, posted in self.posted.items():
            arrivals = sorted(t for t in self.arrived.get(n, []) if t >= sent_from)
            i = 0
            for t in sorted(posted):
                while i < len(arrivals) and arrivals[i] < t:
                    i += 1
                if i < len(arrivals):
                    latencies.append(arrivals[i] - t)
        sent = sum(len(p) for p in self.posted.values())
        within = sum(1 for latency in latencies if latency <= DELIVERY_TARGET_S)
        return {
            "events_posted": sent,
            "post_errors": self.post_errors,
            "stream_errors": self.stream_errors,
            "lists_received": sum(len(a) for a in self.arrived.values()),
            "delivery_p50_ms": _ms(latencies, 50),
            "delivery_p99_ms": _ms(latencies, 99),
            "delivered_within_1s": round(within / sent, 4) if sent else float("nan"),
            "events_delivered_within_1s": within,
            "delivered": round(len(latencies) / sent, 4) if sent else float("nan"),
        }


def _event(n: int, item_id: str) -> dict[str, Any]:
    device, session = session_of(n)
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "view",
        "ts": datetime.now(UTC).isoformat(),
        "anonymous_id": device,
        "session_id": session,
        "item_id": item_id,
    }


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length; its status."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else float("nan")


def _client_process(client: PushClient, ready: Any, go: Any, out: Any) -> None:
    out.put(asyncio.run(client.run(ready, go)))


def run_phase(client: PushClient, get_paths: list[str], get_rate: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Streams (if any) opened first; then the events and the GET load side by side, for the same seconds."""
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    process = ctx.Process(target=_client_process, args=(client, ready, go, out))
    process.start()
    if not ready.wait(180):
        process.kill()
        raise RuntimeError("the streams did not all get their first list")
    go.set()
    gets = run_load(client.port, get_rate, client.seconds, get_paths)
    pushes: dict[str, Any] = out.get()
    process.join()
    return pushes, gets


async def _start_push_helpers(port: int, workers: int) -> None:
    """Open streams until every worker's push helper is ready (each worker starts one with its first
    stream; which worker takes a connection is the kernel's choice), then close them."""
    deadline = time.monotonic() + HELPER_START_S
    connections: list[asyncio.StreamWriter] = []
    try:
        while _metric_total(port, "recs_push_helpers_ready") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers' push helpers were not all ready within {HELPER_START_S:.0f} s")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            path = f"/v1/stream/recommendations?anonymous_id=warm-{len(connections)}&k=10"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n".encode())
            connections.append(writer)
            await asyncio.sleep(0.5)
    finally:
        for writer in connections:
            writer.close()


def _tree_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process and its descendants (uvicorn's workers)."""
    parent = psutil.Process(pid)
    total = 0.0
    for process in [parent, *parent.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def _tree_uss_mb(pid: int) -> float:
    """Memory of a process and its descendants (uvicorn's workers, their push helpers), each counted by the
    pages only it holds (USS): shared pages summed by RSS would count the libraries once a process."""
    parent = psutil.Process(pid)
    return sum(process.memory_full_info().uss for process in [parent, *parent.children(recursive=True)]) / 2**20


def _metric_total(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))


def bench_push(
    streams: int = 200,
    events_per_s: float = 200.0,
    seconds: float = 20.0,
    get_rate: float = 100.0,
    workers: int = 2,
    n_items: int = 50_000,
    n_users: int = 100_000,
    factors: int = 64,
    push_helper: bool = True,
) -> dict[str, Any]:
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="recs-bench-push-") as tmp:
        root = Path(tmp)
        redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
        redis_server.start()
        model = publish_synthetic_model(
            Registry(str(root / "models")), Lake(str(root / "lake")), version="bench",
            n_items=n_items, n_users=n_users, factors=factors, n_categories=200, n_new=50, seed=11,
            out_of_stock_every=BENCH_OUT_OF_STOCK_EVERY, promoted_every=BENCH_PROMOTED_EVERY,
        )  # fmt: skip
        port = free_port()
        env = {
            **os.environ,
            "RECS_VAR_DIR": str(root / "var"),
            "RECS_LAKE__ROOT": str(root / "lake"),
            "RECS_MODELS__ROOT": str(root / "models"),
            "RECS_REDIS__URL": redis_server.url,
            "RECS_API__PUSH_HELPER": str(push_helper).lower(),
        }
        recs = [sys.executable, "-c", "from recs.main import app; app()"]
        processes = [
            subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            for command in (
                [*recs, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                [*recs, "speed", "run"],
            )
        ]
        try:
            _wait_ready(port)
            rng = random.Random(3)
            # Half the requests for the streams' sessions, half for known users (as the serve bench).
            get_paths = [
                f"/v1/recommendations?anonymous_id={d}&session_id={s}&k=10"
                if i % 2
                else f"/v1/recommendations?user_id={rng.choice(model.user_ids)}&k=10"
                for i, (d, s) in enumerate(session_of(rng.randrange(streams)) for _ in range(2000))
            ]
            run_load(port, 50, 3, get_paths)  # warm-up: imports, first LightGBM calls, connections
            if push_helper:  # started by a worker's first stream: before the phases, so neither pays its start
                asyncio.run(_start_push_helpers(port, workers))

            redis_client = redis_server.client()

            def cpu_s() -> dict[str, float]:
                """CPU seconds so far of each part: the API's workers, the speed consumer, redis-server,
                and this process's waited-for children (the streams' and events' client, the GET load)."""
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                return {
                    "api": _tree_cpu_s(processes[0].pid),
                    "speed": _tree_cpu_s(processes[1].pid),
                    "redis": _redis_cpu_s(redis_client),
                    "clients": children.ru_utime + children.ru_stime,
                }

            def phase(open_streams: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
                client = PushClient(port, streams, open_streams, events_per_s, seconds, model.item_ids)
                before, stages_before = cpu_s(), _stage_seconds(port)
                pushes, gets = run_phase(client, get_paths, get_rate)
                after = cpu_s()
                # The GETs' own stages in the workers (the push helpers' lists record none): which part of a
                # GET the streams slow, its wait on Redis (reads) or its CPU (the others).
                gets["stage_ms"] = _stage_ms(stages_before, _stage_seconds(port))
                cpu = {part: after[part] - before[part] for part in before}
                # The clients' CPU split: the streams' and events' process reports its own.
                cpu["push_client"] = pushes.pop("client_cpu_s")
                cpu["get_load"] = cpu.pop("clients") - cpu["push_client"]
                return pushes, gets, cpu

            counters_before = {name: _metric_total(port, name) for name in PUSH_COUNTERS}
            events_only, gets_without, cpu_without = phase(open_streams=False)
            pushes, gets_with, cpu_with = phase(open_streams=True)
            api_memory_mb = _tree_uss_mb(processes[0].pid)
            counters = {name: _metric_total(port, name) - counters_before[name] for name in PUSH_COUNTERS}
            redis_client.close()
        finally:
            for process in processes:
                _stop_group(process)
            redis_server.stop()
    computed = counters["recs_push_computations_total"]
    pushed = counters["recs_pushed_lists_total"]
    events = pushes["events_posted"]
    skipped = counters["recs_push_unchanged_total"]
    return {
        "streams": streams,
        "events_per_s": events_per_s,
        "seconds": seconds,
        **pushes,
        "lists_computed": int(computed),
        "lists_pushed": int(pushed),
        # Besides each stream's first list.
        "lists_computed_per_event": round((computed - streams) / events, 3) if events else float("nan"),
        "pushes_skipped_unchanged": int(counters["recs_push_unchanged_total"]),
        # An event that changed nothing the client sees gets no push, and is credited above to its session's
        # next list, an event later. With no mark coalesced (one computation an event) each skipped list is
        # one such event, and this is the share of the events whose list changed; with coalescing, an estimate.
        "delivered_within_1s_of_changed": (
            round(pushes["events_delivered_within_1s"] / (events - skipped), 4) if events > skipped else float("nan")
        ),
        "marks_coalesced": int(counters["recs_push_coalesced_total"]),
        "lists_dropped_slow_client": int(counters["recs_push_dropped_total"]),
        # The API workers' extra CPU with the streams open (same GETs and events), per list computed.
        "push_cpu_ms_per_list": (
            round((cpu_with["api"] - cpu_without["api"]) * 1000 / computed, 2) if computed else float("nan")
        ),
        "api_cpu_s_without_streams": round(cpu_without["api"], 2),
        "api_cpu_s_with_streams": round(cpu_with["api"], 2),
        "api_memory_mb": round(api_memory_mb, 1),  # the API's processes at the end, push helpers included
        # Every part's CPU seconds in each phase: what the API competes with on the same cores.
        "cpu_s_without_streams": {part: round(v, 2) for part, v in cpu_without.items()},
        "cpu_s_with_streams": {part: round(v, 2) for part, v in cpu_with.items()},
        "get_rate": get_rate,
        "get_p50_ms_without_streams": round(gets_without["p50_ms"], 2),
        "get_p99_ms_without_streams": round(gets_without["p99_ms"], 2),
        "get_p50_ms_with_streams": round(gets_with["p50_ms"], 2),
        "get_p99_ms_with_streams": round(gets_with["p99_ms"], 2),
        "get_p99_ratio": round(gets_with["p99_ms"] / gets_without["p99_ms"], 3),
        "get_stage_ms_without_streams": gets_without["stage_ms"],
        "get_stage_ms_with_streams": gets_with["stage_ms"],
        "get_errors": gets_without["errors"] + gets_with["errors"],
        "post_errors_without_streams": events_only["post_errors"],
        "workers": workers,
        "push_helper": push_helper,
        "items": n_items,
        "factors": factors,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_before": load_before,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
