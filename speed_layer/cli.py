"""Commands of the speed layer: `recs speed run|status` and `recs lake-writer run` (heavy imports inside)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import cast

import typer

speed_app = typer.Typer(
    help="The speed layer: stream consumers that fold events into Redis.", no_args_is_help=True
)
lake_writer_app = typer.Typer(
    help="The lake writer: lands every stream event in the Parquet lake.", no_args_is_help=True
)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _run_one_consumer(index: int, serve_metrics: bool = False) -> None:
    """One consumer process (also the body of each child of `--consumers N`, whose metrics the parent serves)."""
    from common.metrics import serve_metrics as serve
    from common.redis_server import connect
    from common.settings import get_settings
    from speed_layer.consumer import SpeedConsumer, consumer_name

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s speed[{index}] %(levelname)s %(message)s")
    settings = get_settings()
    if serve_metrics:
        serve(settings.metrics.host, settings.metrics.speed_port)
    client = connect(settings.redis.effective_url, timeout_s=max(5.0, settings.speed.block_ms / 1000 + 5))
    SpeedConsumer(client, settings, name=f"{consumer_name()}-{index}").run(_stop_on_signals())


def _seed_catalog() -> None:
    """Give items of the lake's newest catalog snapshot a live state (category, stock) if they lack one."""
    from common.catalog import table_to_items
    from common.catalog_state import seed_missing_items
    from common.lake import Lake
    from common.redis_server import connect
    from common.settings import get_settings

    settings = get_settings()
    items = table_to_items(Lake(settings.lake.root).read_catalog())
    seeded = seed_missing_items(connect(settings.redis.effective_url, timeout_s=30), items)
    logging.getLogger(__name__).info("catalog: %d of %d items seeded into Redis", seeded, len(items))


@speed_app.command("run")
def run(
    consumers: int = typer.Option(1, "--consumers", "-n", min=1, help="Consumer processes in the group."),
) -> None:
    """Consume the event stream until SIGINT/SIGTERM; N processes share the group's load, and a dead one
    is restarted (speed_layer/supervisor.py)."""
    _seed_catalog()
    if consumers == 1:
        _run_one_consumer(0, serve_metrics=True)
        return
    import multiprocessing

    from common.metrics import mark_process_dead, multiprocess_dir, serve_metrics
    from common.settings import get_settings
    from speed_layer.supervisor import supervise

    logging.basicConfig(level=logging.INFO, format="%(asctime)s speed-supervisor %(levelname)s %(message)s")
    settings = get_settings()
    speed, port = settings.speed, settings.metrics.speed_port
    if port:
        # One port for the N children: they write their metrics to files the supervisor's port sums, so
        # the target does not change with N and stays up while a child restarts (common/metrics.py).
        multiprocess_dir(settings.var_dir / "prometheus-speed")
        serve_metrics(settings.metrics.host, port)
    context = multiprocessing.get_context("spawn")
    code = supervise(
        lambda i: context.Process(target=_run_one_consumer, args=(i,), name=f"speed-{i}"),
        consumers, _stop_on_signals(), speed.restarts_per_minute, speed.restart_backoff_s,
        on_exit=mark_process_dead,
    )  # fmt: skip
    if code:
        raise typer.Exit(code)


@speed_app.command("status")
def status(
    budget_s: float = typer.Option(
        2.0, min=0, help="Seconds the keyspace pass may take; past it, counts are estimated."
    ),
) -> None:
    """Print as JSON the groups' lag, the consumers' heartbeats, Redis memory, and each key family's keys
    and bytes."""
    from common import redis_keys
    from common.key_memory import keyspace_usage
    from common.redis_server import connect
    from common.settings import get_settings
    from common.speed_state import read_heartbeats
    from common.stream import group_lag

    settings = get_settings()
    client = connect(settings.redis.effective_url, timeout_s=5)
    stream = settings.redis.stream
    memory = client.info("memory")
    report = {
        "speed_lag": group_lag(client, stream, settings.speed.group),
        "lake_writer_lag": group_lag(client, stream, settings.speed.lake_group),
        "heartbeat_age_s": read_heartbeats(client),
        "speed_version": (cast(bytes | None, client.get(redis_keys.SPEED_VERSION)) or b"").decode() or None,
        "redis": {
            "used_memory": memory["used_memory"],
            "maxmemory": memory["maxmemory"],
            "maxmemory_policy": memory["maxmemory_policy"],
            "stream_length": client.xlen(redis_keys.stream(stream)),
        },
        "keyspace": keyspace_usage(client, budget_s=budget_s).as_json(),
    }
    typer.echo(json.dumps(report, indent=2))


@lake_writer_app.command("run")
def lake_writer_run() -> None:
    """Land stream events in the lake until SIGINT/SIGTERM (flush by size or seconds, ack after rename)."""
    from common.metrics import serve_metrics
    from common.redis_server import connect
    from common.settings import get_settings
    from speed_layer.lake_writer import LakeWriter

    logging.basicConfig(level=logging.INFO, format="%(asctime)s lake-writer %(levelname)s %(message)s")
    settings = get_settings()
    serve_metrics(settings.metrics.host, settings.metrics.lake_writer_port)
    client = connect(settings.redis.effective_url, timeout_s=max(5.0, settings.lake.flush_seconds + 5))
    LakeWriter(client, settings).run(_stop_on_signals())


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.add_typer(speed_app, name="speed")
    app.add_typer(lake_writer_app, name="lake-writer")
