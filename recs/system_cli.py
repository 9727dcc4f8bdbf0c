"""System commands: configuration, the embedded Redis and the local cluster."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from common.settings import SettingsError, dump_settings, get_settings, redacted

redis_app = typer.Typer(help="The embedded redis-server (skipped when RECS_REDIS__URL points elsewhere).")
cluster_app = typer.Typer(
    help="Every role of a deployment as local processes on loopback: Spark master + workers, Redis, "
    "speed consumers, lake writer, API (pids and logs in var/cluster).",
    no_args_is_help=True,
)


def settings_or_exit():
    """Settings, or a clear message and exit code 2 when they are invalid."""
    try:
        return get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


def config() -> None:
    """Print the effective settings, secrets hidden (API keys, passwords in URLs, anything named secret)."""
    typer.echo(dump_settings(settings_or_exit()))


@redis_app.command("start")
def redis_start() -> None:
    """Start the private redis-server on the configured port, data under var/redis."""
    from common.redis_server import embedded_server

    settings = settings_or_exit()
    if settings.redis.url:
        typer.echo(f"RECS_REDIS__URL is set ({redacted(settings.redis.url)}); not starting a private Redis.")
        return
    server = embedded_server(settings.redis)
    server.start()
    typer.echo(f"redis-server running at {server.url} (data in {server.data_dir})")


@redis_app.command("stop")
def redis_stop() -> None:
    """Stop the private redis-server."""
    from common.redis_server import embedded_server

    server = embedded_server(settings_or_exit().redis)
    typer.echo("stopped" if server.stop() else "not running")


@redis_app.command("status")
def redis_status() -> None:
    """Say whether Redis answers, and where."""
    from common.redis_server import connect

    settings = settings_or_exit()
    url = settings.redis.effective_url
    try:
        info = connect(url).info("server")
        typer.echo(f"up: {redacted(url)} (redis {info['redis_version']})")
    except Exception as exc:  # any connection failure means "down" here
        typer.echo(f"down: {redacted(url)} ({exc.__class__.__name__})")
        raise typer.Exit(1) from None


@cluster_app.command("up")
def cluster_up(
    timeout: float = typer.Option(120.0, help="Seconds to wait for the workers and the API to answer."),
    redis_cluster: bool = typer.Option(
        False, "--redis-cluster", help="A Redis Cluster (3 masters, 3 replicas on loopback) instead of one Redis."
    ),
) -> None:
    """Start what is not running yet (a second `up` starts nothing), wait until it answers, print the status."""
    from recs.cluster import ClusterError, batch_settings, status, up

    settings = settings_or_exit()
    try:
        started = up(settings, timeout, redis_cluster=redis_cluster)
    except ClusterError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"started: {', '.join(started) or 'nothing (all running)'}", err=True)
    exports = " ".join(f"{name}='{value}'" for name, value in batch_settings(settings).items())
    typer.echo(f"send the nightly Spark jobs here with: export {exports}", err=True)
    typer.echo(json.dumps(status(settings), indent=2))


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop every process `recs cluster up` started (and nothing else)."""
    from recs.cluster import down

    stopped = down(settings_or_exit())
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing (none running)'}")


@cluster_app.command("status")
def cluster_status() -> None:
    """Print what is up as JSON (exit 1 unless everything is)."""
    from recs.cluster import status

    report = status(settings_or_exit())
    typer.echo(json.dumps(report, indent=2))
    if not report["all_up"]:
        raise typer.Exit(1)


def demo(
    data: str = typer.Option("synthetic", help="synthetic, or online-retail (the real UCI file in ../shared/data)."),
    size: str = typer.Option("small", help="Synthetic size: tiny, small, medium, large."),
    seed: int = typer.Option(42, help="Generator seed."),
    csv: Path | None = typer.Option(None, help="Online Retail file (default: ../shared/data/online_retail/...)."),
    retrain: bool = typer.Option(False, help="Run the DAG even if the serving model already has this cutoff."),
    max_live_events: int | None = typer.Option(None, help="Stream at most this many live events."),
    on_cluster: bool = typer.Option(
        False, "--cluster", help="Run the live part against `recs cluster up` (its API, speed layer and Redis)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what the demo did as one JSON object at the end."),
) -> None:
    """The whole lambda loop: data, the nightly DAG, Redis + speed layer + API, a live day, the report."""
    from recs.demo import result_json, run_demo

    if data not in ("synthetic", "online-retail"):
        raise typer.BadParameter(f"{data!r} is not synthetic or online-retail", param_hint="--data")
    from recs.generate import SIZES

    if size not in SIZES:
        raise typer.BadParameter(f"{size!r} is not one of {', '.join(SIZES)}", param_hint="--size")
    try:
        result = run_demo(settings_or_exit(), data, size, seed, csv, retrain, max_live_events, on_cluster)
    except KeyboardInterrupt:
        typer.echo("interrupted; everything the demo started has been stopped")
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(result_json(result))


def register(app: typer.Typer) -> None:
    app.command("config")(config)
    app.command("demo")(demo)
    app.add_typer(redis_app, name="redis")
    app.add_typer(cluster_app, name="cluster")
