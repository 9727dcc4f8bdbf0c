"""System commands: configuration and the embedded Redis."""

from __future__ import annotations

import typer

from common.settings import SettingsError, dump_settings, get_settings

redis_app = typer.Typer(help="The embedded redis-server (skipped when RECS_REDIS__URL points elsewhere).")


def settings_or_exit():
    """Settings, or a clear message and exit code 2 when they are invalid."""
    try:
        return get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


def config() -> None:
    """Print the effective settings (API keys hidden)."""
    typer.echo(dump_settings(settings_or_exit()))


@redis_app.command("start")
def redis_start() -> None:
    """Start the private redis-server on the configured port, data under var/redis."""
    from common.redis_server import embedded_server

    settings = settings_or_exit()
    if settings.redis.url:
        typer.echo(f"RECS_REDIS__URL is set ({settings.redis.url}); not starting a private Redis.")
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
        typer.echo(f"up: {url} (redis {info['redis_version']})")
    except Exception as exc:  # any connection failure means "down" here
        typer.echo(f"down: {url} ({exc.__class__.__name__})")
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("config")(config)
    app.add_typer(redis_app, name="redis")
