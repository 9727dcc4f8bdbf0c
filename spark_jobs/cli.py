"""`recs batch run` and `recs model list|activate|rollback`: the batch layer's commands (`recs batch train`,
which also runs the gate's replay through the other layers, is in recs/nightly.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any

import typer

batch_app = typer.Typer(help="Batch layer: the nightly retrain (Spark or implicit ALS, LightGBM ranker, gate).")
model_app = typer.Typer(help="Model registry: list versions, activate one, roll back.")


def _settings() -> Any:
    from common.settings import SettingsError, get_settings

    try:
        return get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


@batch_app.command("run")
def run(
    day: Annotated[str, typer.Option("--date", help="Logical date YYYY-MM-DD; the run trains on events received before it.")],
) -> None:
    """Run the real nightly_retrain DAG once through `airflow dags test` (Airflow home under var/airflow)."""
    from spark_jobs.airflow_run import dags_test

    try:
        logical = date.fromisoformat(day)
    except ValueError:
        raise typer.BadParameter(f"{day!r} is not a date like 2026-11-01", param_hint="--date") from None
    settings = _settings()
    done = dags_test(settings, logical)
    if done.returncode != 0:
        raise typer.Exit(done.returncode)
    # `dags test` also "succeeds" when it created no task instances; a run must leave a decided version.
    from common.registry import Registry

    cutoff = datetime.combine(logical, datetime.min.time(), tzinfo=UTC)
    decided = [m for m in Registry(settings.models.root).manifests() if m.cutoff == cutoff]
    if not decided:
        typer.secho(f"the DAG run for {logical} finished but no model version has cutoff {cutoff:%Y-%m-%d}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{decided[-1].version}: {decided[-1].status} ({decided[-1].decision})")


@model_app.command("list")
def list_versions() -> None:
    """Every version with its status, cutoff, engine, the gate's replayed MRR@20 of its full lists and of
    its batch+speed lists, the offline MRR@20 with and without the ranker, a drift mark (`recs drift report`)
    and the gate's decision (the serving version is starred)."""
    from common.registry import Registry
    from spark_jobs.gate import GATE_METRIC, OFFLINE_POOL, OFFLINE_RANKED, REPLAY_FULL, REPLAY_OWN

    registry = Registry(_settings().models.root)
    current = registry.current()
    for manifest in registry.manifests():
        mark = "*" if manifest.version == current else " "
        full, own, ranked, plain = (
            _metric(manifest.metrics, s, GATE_METRIC) for s in (REPLAY_FULL, REPLAY_OWN, OFFLINE_RANKED, OFFLINE_POOL)
        )
        drifted = registry.drift_marker(manifest.version)
        drift = f"DRIFTED {drifted.checked_at:%Y-%m-%d %H:%M} ({'; '.join(drifted.reasons)})  " if drifted else ""
        typer.echo(
            f"{mark} {manifest.version:<30} {manifest.status:<10} cutoff {manifest.cutoff:%Y-%m-%d %H:%M} "
            f"{manifest.engine:<8} mrr@20 replay full {full} batch+speed {own} | offline ranker {ranked} pool {plain}  "
            f"{drift}{manifest.decision or ''}"
        )


def _metric(metrics: dict[str, dict[str, float]], strategy: str, name: str) -> str:
    value = metrics.get(strategy, {}).get(name)
    return f"{value:.4f}" if value is not None else "  -   "


@model_app.command("activate")
def activate(version: Annotated[str, typer.Argument(help="The version to serve.")]) -> None:
    """Point CURRENT at a version and tell serving and the speed layer to reload."""
    from common.registry import Registry, RegistryError

    settings = _settings()
    try:
        event = Registry(settings.models.root).activate(version, kind="activated")
    except RegistryError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    _announce(settings, event.model_dump_json(), f"serving {version}")


@model_app.command("rollback")
def rollback() -> None:
    """Re-activate the version that served before the current one, and tell serving."""
    from common.registry import Registry, RegistryError

    settings = _settings()
    try:
        event = Registry(settings.models.root).rollback()
    except RegistryError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    _announce(settings, event.model_dump_json(), f"rolled back from {event.previous} to {event.version}")


def _announce(settings: Any, event_json: str, message: str) -> None:
    from spark_jobs.pipeline import notify

    heard = notify(settings, event_json)
    typer.echo(message + ("" if heard else " (Redis unreachable: serving picks it up on its next reload)"))


def airflow_ui() -> None:
    """Start `airflow standalone` (UI, scheduler, SQLite) on this project's DAGs, Airflow home under var/."""
    import os

    from spark_jobs.airflow_run import airflow_binary, airflow_env, ensure_db

    settings = _settings()
    ensure_db(settings)
    typer.echo(f"Airflow home {settings.var_dir / 'airflow'}; the admin password is printed below and kept there.")
    os.execvpe(airflow_binary(), [airflow_binary(), "standalone"], airflow_env(settings))


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.command("airflow")(airflow_ui)
    app.add_typer(batch_app, name="batch")
    app.add_typer(model_app, name="model")
