"""`recs demo`: the whole lambda loop end to end on embedded defaults.

History goes to the lake, the real nightly DAG trains and publishes a model, then Redis, the
speed layer, the lake writer and the API start; a live day of events streams through
`POST /v1/events`, and the demo shows one person's recommendations change, measures
freshness and latency, and builds the warehouse report. Everything it started, it stops.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from common.events import deterministic_event_id
from common.lake import CATALOG, Lake
from common.redis_server import connect, embedded_server, free_port
from common.registry import Registry
from common.settings import Settings, redacted
from spark_jobs.gate import REPLAY_ENTRIES, REPLAY_FULL, REPLAY_OWN

console = Console()
POST_BATCH = 200


@dataclass
class DemoResult:
    """What the demo did, as the CI test and `--json` read it."""

    model_version: str | None = None
    history_events: int = 0
    live_events_sent: int = 0
    live_events_accepted: int = 0
    person_id: str | None = None
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    browsed_category: str | None = None
    after_categories: list[str] = field(default_factory=list)
    freshness_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    degraded: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    report: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.before) and self.before != self.after


# ------------------------------------------------------------------ data


def prepare_source(settings: Settings, data: str, size: str, seed: int, csv_path: Path | None) -> Lake:
    """A staging lake holding the whole history plus the live day (made once, then reused)."""
    source = Lake(str(settings.var_dir / "demo" / f"source-{data}-{size}-{seed}"))
    if source.event_days():
        return source
    if data == "synthetic":
        from recs.generate import generate

        # The window ends tomorrow, so its last day is today: the "live day" the demo streams.
        end = datetime.now(UTC).date() + timedelta(days=1)
        summary = generate(size, seed, source, end_date=end)
        console.print(f"generated {summary.events:,} synthetic events ({size}, seed {seed})")
    else:
        from recs.importers import import_online_retail

        report = import_online_retail(csv_path or default_online_retail(), source)
        console.print(f"imported Online Retail: {sum(report.events_by_type.values()):,} events")
    return source


def default_online_retail() -> Path:
    from common.settings import PROJECT_ROOT

    return PROJECT_ROOT.parent / "shared" / "data" / "online_retail" / "online_retail.csv.gz"


def split_history(source: Lake, lake: Lake) -> tuple[date, pa.Table, int]:
    """Copy every day but the last into the lake; return the live day and its events."""
    days = source.event_days()
    live_day = days[-1]
    cutoff = datetime.combine(live_day, datetime.min.time(), tzinfo=UTC)
    if not lake.event_days():
        for day in days[:-1]:
            start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
            lake.write_events(source.read_events(start, start + timedelta(days=1)))
        lake.write_catalog(source.read_catalog(), at=cutoff)
    history = lake.read_events(end=cutoff, columns=["event_id"]).num_rows
    live = source.read_events(start=cutoff).sort_by("received_at")
    return live_day, live, history


# ------------------------------------------------------------------ processes


@contextmanager
def services(settings: Settings, port: int) -> Iterator[tuple[str, str]]:
    """Redis (unless external), one speed consumer, the lake writer and the API; stopped on exit."""
    server = None
    redis_url = settings.redis.effective_url
    if not settings.redis.url:
        server = embedded_server(settings.redis)
        server.start()
        redis_url = server.url  # the port may have been picked free
    env = {
        **os.environ,
        "RECS_REDIS__URL": redis_url,
        "RECS_VAR_DIR": str(settings.var_dir),
        "RECS_LAKE__ROOT": settings.lake.root,
        "RECS_MODELS__ROOT": settings.models.root,
        "RECS_LAKE__FLUSH_SECONDS": "2",  # the demo reads the lake back within seconds
    }
    recs = [sys.executable, "-m", "recs.main"]
    logs = settings.var_dir / "demo" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "speed": [*recs, "speed", "run"],
        "lake-writer": [*recs, "lake-writer", "run"],
        "api": [*recs, "serve", "--workers", "1", "--port", str(port)],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, cmd in commands.items():
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://{settings.api.host}:{port}"
        wait_ready(base, procs["api"], logs / "api.log")
        console.print(f"services up: Redis {redacted(redis_url)}, speed layer, lake writer, API {base}")
        yield base, redis_url
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server is not None:
            server.stop()
        console.print("stopped everything the demo started")


@contextmanager
def cluster_services(settings: Settings, lake: Lake) -> Iterator[tuple[str, str]]:
    """The API, speed consumers and lake writer `recs cluster up` runs, on its Redis or Redis Cluster; the
    demo stops none of them."""
    from recs import cluster

    state = cluster.status(settings)
    if not state["all_up"]:
        down = [name for name, process in state["processes"].items() if not process["up"]]
        raise RuntimeError(
            f"`recs cluster up` is not running ({', '.join(down) or 'Redis'} down): start it first, with the "
            "same RECS_VAR_DIR"
        )
    # The API and the speed layer read the lake's catalog when they start (a model reaches them later
    # over pub/sub, a catalog snapshot does not), so ones started before the demo wrote it lack it.
    stale = [name for name in state["processes"] if name.startswith(("api", "speed")) and
             _started_before_catalog(settings, lake, name)]  # fmt: skip
    if stale:
        raise RuntimeError(
            f"{', '.join(stale)} started before the demo wrote the lake's catalog and serve without it: run "
            "`recs cluster down`, `recs cluster up` (with the same options) and this demo again (the data "
            "and the model are kept)"
        )
    base, redis_url = cluster.api_url(settings), cluster.redis_url(settings)
    console.print(f"using `recs cluster`: Redis {redacted(redis_url)}, its speed layer, lake writer and API {base}")
    yield base, redis_url


def _started_before_catalog(settings: Settings, lake: Lake, name: str) -> bool:
    from recs.cluster import running

    stamps, process = lake.catalog_snapshots(), running(settings, name)
    if not stamps or process is None:
        return False
    written = lake.fs.modified(lake.path(CATALOG, f"snapshot={stamps[-1]}", "items.parquet"))
    return bool(process.create_time() < written.timestamp())


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API was not ready within {timeout_s:.0f} s; see {log}")


# ------------------------------------------------------------------ the live part


def live_payloads(live: pa.Table, run_stamp: str) -> list[dict[str, Any]]:
    """The live day's events as API payloads: new ids per demo day, event time = now at send."""
    rows = live.drop_columns(["received_at"]).to_pylist()
    for row in rows:
        row["event_id"] = deterministic_event_id(row["event_id"], run_stamp)
        row["context"]["extra"] = dict(row["context"]["extra"] or [])
        for key in [k for k, v in row.items() if v is None]:
            del row[key]
    return rows


def stream_events(client: httpx.Client, payloads: list[dict[str, Any]]) -> int:
    accepted = 0
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("streaming the live day through POST /v1/events", total=len(payloads))
        for i in range(0, len(payloads), POST_BATCH):
            batch = payloads[i : i + POST_BATCH]
            now = datetime.now(UTC).isoformat()
            for row in batch:
                row["ts"] = now
            response = client.post("/v1/events", json=batch)
            if response.status_code == 503:  # backpressure: wait as told, then resend the same ids
                time.sleep(float(response.headers.get("Retry-After", "1")))
                response = client.post("/v1/events", json=batch)
            accepted += response.json().get("accepted", 0)
            progress.advance(task, len(batch))
    return accepted


def wait_drained(settings: Settings, redis_url: str, timeout_s: float = 60) -> None:
    """Wait until the speed layer has applied everything streamed so far."""
    from common.stream import group_lag

    client = connect(redis_url, timeout_s=2)
    deadline = time.monotonic() + timeout_s
    while group_lag(client, settings.redis.stream, settings.speed.group) > 0:
        if time.monotonic() > deadline:
            console.print("[yellow]the speed layer is still catching up; going on[/yellow]")
            return
        time.sleep(0.1)


def recommend(client: httpx.Client, person: str, session: str, k: int = 10) -> dict[str, Any]:
    response = client.get("/v1/recommendations", params={"user_id": person, "session_id": session, "k": k})
    response.raise_for_status()
    return dict(response.json())


def show(title: str, answer: dict[str, Any]) -> None:
    table = Table(title=f"{title} (model {answer['model_version']}, variant {answer['variant']})")
    for column in ("#", "item", "category", "reason"):
        table.add_column(column)
    for i, item in enumerate(answer["items"], 1):
        table.add_row(str(i), item["item_id"], item["category"], item["reason"])
    console.print(table)
    if answer.get("degraded"):
        console.print(f"[yellow]degraded: {answer['degraded']}[/yellow]")


def pick_person(registry: Registry) -> str:
    """A person the model knows (the first user id in the current version)."""
    from common.model import load_model

    model = load_model(registry)
    return model.user_ids[len(model.user_ids) // 2]


def browse_a_category(
    client: httpx.Client, lake: Lake, person: str, session: str, before: dict[str, Any]
) -> tuple[dict[str, Any], float | None]:
    """View three items of a category absent from the person's list; time until the list changes."""
    shown = {item["category"] for item in before["items"]}
    catalog = lake.read_catalog()
    categories = [c for c in pc.unique(catalog["category"]).to_pylist() if c not in shown]
    target = sorted(categories)[0] if categories else catalog["category"][0].as_py()
    in_category = set(catalog.filter(pc.equal(catalog["category"], target))["item_id"].to_pylist())
    items = [i for i in most_viewed(lake) if i in in_category][:3]
    console.print(f"{person} now views 3 items in [bold]{target}[/bold]: {', '.join(items)}")
    before["browsed_category"] = target
    events = [
        {
            "event_id": str(uuid.uuid4()),
            "event_type": "view",
            "ts": datetime.now(UTC).isoformat(),
            "anonymous_id": f"device-{person}",
            "user_id": person,
            "session_id": session,
            "item_id": item,
            "dwell_ms": 40_000,
        }
        for item in items
    ]
    sent = time.perf_counter()
    client.post("/v1/events", json=events).raise_for_status()
    deadline = sent + 10
    after = before
    while time.perf_counter() < deadline:
        after = recommend(client, person, session)
        if any(item["category"] == target for item in after["items"]):
            return after, (time.perf_counter() - sent) * 1000
        time.sleep(0.01)
    return after, None


def most_viewed(lake: Lake) -> list[str]:
    """Item ids by number of events in the lake, most first (popular items have co-visitation data)."""
    counts = lake.read_events(columns=["item_id"])["item_id"].drop_null().value_counts()
    ranked = sorted(counts.to_pylist(), key=lambda c: (-c["counts"], c["values"]))
    return [c["values"] for c in ranked]


def measure_latency(client: httpx.Client, registry: Registry, n: int = 200) -> tuple[float, float]:
    from common.model import load_model

    users = load_model(registry).user_ids[:n]
    timings = []
    for i, user in enumerate(users * (n // max(1, len(users)) + 1)):
        if i >= n:
            break
        start = time.perf_counter()
        client.get("/v1/recommendations", params={"user_id": user, "k": 10}).raise_for_status()
        timings.append((time.perf_counter() - start) * 1000)
    timings.sort()
    return statistics.median(timings), timings[int(0.99 * (len(timings) - 1))]


# ------------------------------------------------------------------ the whole run


def train(settings: Settings, registry: Registry, live_day: date, retrain: bool) -> str:
    """Run the real DAG for the live day unless the current version already has that cutoff."""
    cutoff = datetime.combine(live_day, datetime.min.time(), tzinfo=UTC)
    current = registry.current()
    if current and not retrain and registry.read_manifest(current).cutoff == cutoff:
        console.print(f"reusing model {current} (cutoff {cutoff:%Y-%m-%d}); --retrain to run the DAG again")
        return current
    from spark_jobs.airflow_run import dags_test

    console.print(f"running the nightly_retrain DAG through `airflow dags test` for {live_day} ...")
    started = time.perf_counter()
    done = dags_test(settings, live_day, capture=True)
    if done.returncode != 0:
        log = settings.var_dir / "demo" / "logs" / "dag.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(done.stdout + done.stderr)
        raise RuntimeError(f"the DAG run failed; see {log}")
    version = registry.current()
    if version is None:
        raise RuntimeError("the DAG finished but published no model (the gate rejected it?); see `recs model list`")
    console.print(f"DAG done in {time.perf_counter() - started:.0f} s; serving model {version}")
    return version


def run_demo(
    settings: Settings,
    data: str = "synthetic",
    size: str = "small",
    seed: int = 42,
    csv_path: Path | None = None,
    retrain: bool = False,
    max_live_events: int | None = None,
    on_cluster: bool = False,
) -> DemoResult:
    """`on_cluster`: the live part runs against the processes of `recs cluster up` (its Redis, or the Redis
    Cluster of `--redis-cluster`) instead of starting its own; a model the DAG publishes reaches them."""
    if on_cluster:
        from recs import cluster

        url = cluster.redis_url(settings)
        settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})
    result = DemoResult()
    lake = Lake(settings.lake.root)
    registry = Registry(settings.models.root)

    source = prepare_source(settings, data, size, seed, csv_path)
    live_day, live, result.history_events = split_history(source, lake)
    console.print(f"lake: {result.history_events:,} events before {live_day}; {live.num_rows:,} live events to stream")
    result.model_version = train(settings, registry, live_day, retrain)
    manifest = registry.read_manifest(result.model_version)
    result.metrics = manifest.metrics

    live_services = cluster_services(settings, lake) if on_cluster else services(settings, free_port())
    with live_services as (base, redis_url), httpx.Client(base_url=base, timeout=10) as client:
        person = pick_person(registry)
        session = f"demo-{uuid.uuid4().hex[:8]}"
        before = recommend(client, person, session)
        show(f"Recommendations for {person} before", before)

        payloads = live_payloads(live, datetime.now(UTC).strftime("%Y-%m-%d"))[:max_live_events]
        result.live_events_sent = len(payloads)
        result.live_events_accepted = stream_events(client, payloads)
        wait_drained(settings, redis_url)

        after, result.freshness_ms = browse_a_category(client, lake, person, session, before)
        show(f"Recommendations for {person} after", after)
        result.person_id = person
        result.before = [i["item_id"] for i in before["items"]]
        result.after = [i["item_id"] for i in after["items"]]
        result.browsed_category = before.get("browsed_category")
        result.after_categories = [i["category"] for i in after["items"]]
        result.degraded = after.get("degraded")
        result.latency_p50_ms, result.latency_p99_ms = measure_latency(client, registry)
        time.sleep(3)  # the lake writer flushes every 2 s in the demo

    result.report = str(write_warehouse_report(settings))
    print_summary(result)
    return result


def write_warehouse_report(settings: Settings) -> Path:
    """Rebuild the warehouse over the lake (now holding the live day) and render its report."""

    from warehouse.build import refresh_warehouse
    from warehouse.query import open_read_only
    from warehouse.report import render_report

    con = open_read_only(refresh_warehouse(settings))  # reads a lake on s3:// too
    try:
        html = render_report(con)
    finally:
        con.close()
    report = settings.var_dir / "report.html"
    report.write_text(html, encoding="utf-8")
    return report


def print_summary(result: DemoResult) -> None:
    table = Table(title=f"Offline metrics of {result.model_version} (held-out window)")
    table.add_column("strategy")
    # Not the paired tests, nor the gate's replay figures (printed under the table).
    strategies = {s: m for s, m in result.metrics.items() if "mrr_at_20" in m and s not in REPLAY_ENTRIES}
    names = sorted({m for metrics in strategies.values() for m in metrics})
    for name in names:
        table.add_column(name)
    for strategy, metrics in strategies.items():
        table.add_row(strategy, *(f"{metrics.get(n, float('nan')):.4f}" for n in names))
    console.print(table)
    paired = result.metrics.get("paired_vs_heuristic")
    if paired:
        console.print(
            f"ranker vs its own pool, MRR@20 difference {paired['mean']:+.4f} "
            f"(95% {paired['low']:+.4f}..{paired['high']:+.4f}), HR@20 difference {paired.get('hr_mean', 0.0):+.4f} "
            f"(95% {paired.get('hr_low', 0.0):+.4f}..{paired.get('hr_high', 0.0):+.4f}), {paired['sessions']:.0f} sessions"
        )
    full, own = (result.metrics.get(name, {}).get("mrr_at_20") for name in (REPLAY_FULL, REPLAY_OWN))
    if full is not None and own is not None:
        console.print(f"the gate's replay of the evaluation window (dev model), MRR@20: full {full:.4f}, batch+speed {own:.4f}")
    freshness = f"{result.freshness_ms:.0f} ms" if result.freshness_ms is not None else "not seen within 10 s"
    console.print(f"freshness (POST /v1/events to the browsed category in the list): {freshness}")
    console.print(f"GET /v1/recommendations latency: p50 {result.latency_p50_ms:.1f} ms, p99 {result.latency_p99_ms:.1f} ms")
    console.print(f"live events accepted: {result.live_events_accepted:,} of {result.live_events_sent:,}")
    console.print(f"warehouse report: {result.report}")


def result_json(result: DemoResult) -> str:
    data = {k: v for k, v in result.__dict__.items()}
    data["changed"] = result.changed
    return json.dumps(data, indent=2, default=str)
