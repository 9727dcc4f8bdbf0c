"""Commands of this layer (filled in as the layer lands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from bench.serve import RealLake

bench_app = typer.Typer(help="Benchmarks; each prints one JSON object.", no_args_is_help=True)


@bench_app.command("warehouse")
def warehouse(
    lake: Path = typer.Option(..., "--lake", help="Lake root to benchmark (a generated or imported lake)."),
    repeat: int = typer.Option(3, min=1, help="Timed runs per query; the best is reported."),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Time the warehouse's daily_kpis and funnel views over a whole lake."""
    from bench.warehouse import run_warehouse_bench

    result = run_warehouse_bench(lake, repeat=repeat)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


def _real_lake(lake: Path | None, days: int, models: Path | None) -> RealLake | None:
    """`--lake`, `--days` and `--models` as one choice: a store's own events, or None (synthetic)."""
    from bench.serve import RealLake

    if lake is None:
        if models is not None:
            raise typer.BadParameter("--models goes with --lake")
        return None
    return RealLake(str(lake.resolve()), days, models.resolve() if models else None)


@bench_app.command("serve")
def serve(
    seconds: float = typer.Option(30.0, min=1, help="Seconds at the base rate (200 req/s)."),
    in_process: bool = typer.Option(
        False, "--in-process", help="Instead: the recommender's CPU, Redis commands and bytes per request in one "
        "process, a profile, and the lists (bench/serve_profile.py).",
    ),
    against: Path | None = typer.Option(
        None, "--against", help="With --in-process or --instructions: another checkout (e.g. a worktree of main) run "
        "on the same state; its lists must be identical.", exists=True, file_okay=False,
    ),
    rounds: int = typer.Option(3, min=1, help="With --in-process: rounds, each a fresh process per checkout."),
    instructions: int | None = typer.Option(
        None, "--instructions", min=10, help="Instead: the instructions Redis runs per request, counted by valgrind "
        "over this many requests of the mix (the same on a busy machine; bench/serve_instructions.py).",
    ),
    worker: bool = typer.Option(
        False, "--worker", help="With --instructions: the recommender's own instructions per request too, its "
        "process under callgrind (several times slower).",
    ),
    lake: Path | None = typer.Option(
        None, "--lake", help="Instead of the synthetic model: a store's lake (e.g. `recs data import`'s); the model "
        "is trained on the days before the last --days, which go through the speed layer (bench/lake_state.py).",
        exists=True, file_okay=False,
    ),
    days: int = typer.Option(16, min=1, help="With --lake: the last days folded through the speed layer."),
    models: Path | None = typer.Option(
        None, "--models", help="With --lake: a registry folder that keeps the trained version for the next run "
        "(training a real lake takes minutes).", file_okay=False,
    ),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """API latency: 2 workers on a 50k-item, 64-factor synthetic model (or a real lake's) with live speed
    state, fixed-rate load from another process, beside a no-op route on the same server (ratio_to_noop);
    a step at twice the highest rate held shows what an overloaded worker sheds (overload)."""
    real = _real_lake(lake, days, models)
    if in_process and instructions is not None:
        raise typer.BadParameter("--in-process and --instructions are two different measurements: choose one")
    if worker and instructions is None:
        raise typer.BadParameter("--worker goes with --instructions")
    if instructions is not None:
        from bench.serve_instructions import run_serve_instructions

        result = run_serve_instructions(requests=instructions, against=against, real=real, worker=worker)
    elif in_process:
        from bench.serve_profile import bench_in_process

        result = bench_in_process(against=against, rounds=rounds, real=real)
    else:
        if against is not None:
            raise typer.BadParameter("--against goes with --in-process or --instructions")
        from bench.serve import bench_serve

        result = bench_serve(seconds=seconds, real=real)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("ingest")
def ingest(
    seconds: float = typer.Option(20.0, min=1, help="Seconds at the base rate."),
    rate: float = typer.Option(500.0, min=1, help="The base rate, in POSTs a second."),
    events_per_post: int = typer.Option(2, "--events-per-post", min=1, help="Events in each POST's body."),
    against: Path | None = typer.Option(
        None, "--against", help="Another checkout (e.g. a worktree of main) whose server runs on the same load, "
        "alternately.", exists=True, file_okay=False,
    ),
    in_process: bool = typer.Option(
        False, "--in-process", help="Instead: the app's CPU and Redis' a POST, through the ASGI app in one "
        "process per checkout and round (no sockets).",
    ),
    rounds: int = typer.Option(1, min=1, help="Rounds; each runs every checkout once."),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Event ingestion: POST /v1/events on 2 workers, tracker-sized bodies, fixed-rate load from another
    process; the highest rate with p99 <= 50 ms and the CPU a POST, beside a no-op POST route."""
    from bench.ingest import bench_ingest, bench_ingest_in_process

    if in_process:
        result = bench_ingest_in_process(against=against, rounds=rounds, events_per_post=events_per_post)
    else:
        result = bench_ingest(
            seconds=seconds, base_rate=rate, events_per_post=events_per_post, against=against, rounds=rounds
        )
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("push")
def push(
    streams: int = typer.Option(200, min=1, help="SSE streams opened, one per session."),
    events_per_s: float = typer.Option(200.0, "--events-per-s", min=1, help="Events/s posted for those sessions."),
    seconds: float = typer.Option(20.0, min=5, help="Seconds of each phase (without, then with the streams)."),
    get_rate: float = typer.Option(100.0, "--get-rate", min=1, help="GET /v1/recommendations per second."),
    push_helper: bool = typer.Option(
        True, "--push-helper/--no-push-helper", help="Lists computed by each worker's push helper, or by the worker."
    ),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Live pushes: delivery latency and share within 1 s, GET latency with and without the open streams."""
    from bench.push import bench_push

    result = bench_push(
        streams=streams, events_per_s=events_per_s, seconds=seconds, get_rate=get_rate, push_helper=push_helper
    )
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("speed")
def speed(
    events: int = typer.Option(50_000, min=1000, help="Events drained by one consumer for the throughput figure."),
    offered: float = typer.Option(
        10_000.0, "--offered-rate", "--offered", min=1, help="Events/s offered for the freshness figure."
    ),
    seconds: float = typer.Option(5.0, min=1, help="Seconds of offered load."),
    repeats: int = typer.Option(3, min=1, help="Throughput and freshness runs, each on a fresh Redis; the median is reported."),
    consumers: list[int] = typer.Option(
        [], "--consumers", min=1, help="Instead: events/s of this many consumer processes (repeatable: 1 2 4)."
    ),
    redis_cluster: bool = typer.Option(
        False, "--redis-cluster", help="With --consumers: on a 3-master 3-replica Redis Cluster."
    ),
    lake: Path | None = typer.Option(
        None, "--lake", help="Instead: events/s of one consumer draining a store's own last --days days of events "
        "in arrival order, on the model trained on the days before (bench/lake_state.py).",
        exists=True, file_okay=False,
    ),
    days: int = typer.Option(16, min=1, help="With --lake: the last days drained."),
    models: Path | None = typer.Option(
        None, "--models", help="With --lake: a registry folder that keeps the trained version for the next run.",
        file_okay=False,
    ),
    instructions: int | None = typer.Option(
        None, "--instructions", min=100, help="Instead: the instructions Redis runs per event, counted by valgrind "
        "over this many events of each mix (the same on a busy machine; bench/instructions.py).",
    ),
    against: Path | None = typer.Option(
        None, "--against", help="With --instructions: another checkout (e.g. a worktree of main) counted on the "
        "same events; the ratio this / against.", exists=True, file_okay=False,
    ),
    consumer: bool = typer.Option(
        False, "--consumer", help="With --instructions: the consumer's own instructions per event too, its "
        "process under callgrind (several times slower).",
    ),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Speed layer: events/s of one consumer with all effects on, each session's events in a row and
    (`browsing`) from visitors browsing at once; XADD-to-announced freshness p50/p99 of browsing
    visitors. With --consumers N (repeatable): events/s of N consumer processes draining `events`."""
    from bench.speed import run_speed_bench, run_speed_bench_on_lake, run_speed_scaling

    if instructions is not None:
        from bench.instructions import run_speed_instructions

        counted = run_speed_instructions(events=instructions, against=against, consumer=consumer)
        typer.echo(json.dumps(counted) if as_json else json.dumps(counted, indent=2))
        return
    if against is not None or consumer:
        raise typer.BadParameter("--against and --consumer go with --instructions")
    real = _real_lake(lake, days, models)
    if real is not None:
        if consumers or redis_cluster:
            raise typer.BadParameter("--lake goes without --consumers and --redis-cluster")
        on_lake = run_speed_bench_on_lake(real, repeats)
        typer.echo(json.dumps(on_lake) if as_json else json.dumps(on_lake, indent=2))
        return
    if consumers:
        scaling = run_speed_scaling(consumers, redis_cluster=redis_cluster, events=events, repeats=repeats)
        typer.echo(json.dumps(scaling) if as_json else json.dumps(scaling, indent=2))
        return
    if redis_cluster:
        raise typer.BadParameter("--redis-cluster goes with --consumers")
    result = run_speed_bench(events=events, offered_per_s=offered, freshness_s=seconds, repeats=repeats)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("trending")
def trending(
    items: list[int] = typer.Option(
        [500, 2000, 5000], "--items", min=1, help="Items a bucket (repeatable): one comparison each."
    ),
    passes: int = typer.Option(6, min=2, help="Re-sums per side; the first (every bucket read) reported apart."),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Trending's re-sum side by side: one ZUNIONSTORE of the window's 72 buckets against the consumer's
    copy (speed_layer/trending.py): the longest command Redis ran, Redis' and the caller's CPU, wall time;
    and whether the lists are identical."""
    from bench.trending import bench_trending

    result = bench_trending(tuple(items), passes)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("train")
def train(
    engine: str = typer.Option("implicit", help="spark or implicit."),
    lake: str | None = typer.Option(None, "--lake", help="Lake root; default: generate the synthetic small set."),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """ALS fit time, peak RSS and Recall@20 of one engine on the same interactions."""
    from bench.train import bench_train
    from common.settings import get_settings

    if engine not in ("spark", "implicit"):
        raise typer.BadParameter(f"{engine!r} is not spark or implicit", param_hint="--engine")
    result = bench_train(get_settings(), engine, lake)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@bench_app.command("soak")
def soak(
    minutes: float = typer.Option(10.0, min=1, help="Length of the run; every TTL is shortened to 40% of it (60 s at least)."),
    rate: float = typer.Option(200.0, min=1, help="Events/s posted to the API."),
    consumers: int = typer.Option(1, min=1, help="Speed consumer processes (`recs speed run --consumers`)."),
    sample_s: float = typer.Option(60.0, min=5, help="Seconds between samples."),
    as_json: bool = typer.Option(True, "--json/--pretty", help="Compact JSON (default) or indented."),
) -> None:
    """Redis memory, keys, stream length and each process's RSS under a steady load: growth per minute."""
    from bench.soak import run_soak

    result = run_soak(minutes, rate=rate, consumers=consumers, sample_s=sample_s)
    typer.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.add_typer(bench_app, name="bench")
