"""The nightly run without Airflow, for development and tests: the DAG's tasks in the DAG's order, and
`recs batch train`. It lives here, not in spark_jobs, because the gate's replay step serves the
candidate through the speed layer and serving (evaluation/gate_replay.py), which the batch layer
may not import.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from common.settings import Settings
from spark_jobs.plan import Plan


def run_all(settings: Settings, plan: Plan, force: bool = False, notify_redis: bool = True) -> dict[str, Any]:
    """The whole nightly run: same functions, same order as dags/nightly_retrain.py."""
    from evaluation.gate_replay import replay_gate
    from spark_jobs import pipeline

    if force:
        pipeline.reset(plan, settings)
    out: dict[str, Any] = {}
    try:
        out["validate"] = pipeline.validate(settings, plan.cutoff)
    finally:  # as the DAG's apply_erasures (trigger rule all_done): erasure is owed whatever validation found
        out["erase"] = pipeline.erase(settings)
    for name, step in (
        ("interactions", pipeline.build_interactions),
        ("als", pipeline.train_als),
        ("content", pipeline.train_content_map),
        ("ranker", pipeline.train_ranker),
        ("evaluate", pipeline.evaluate),
        ("replay", replay_gate),
        ("gate", pipeline.gate_and_publish),
    ):
        out[name] = step(plan, settings)
    if notify_redis:
        out["notified"] = pipeline.notify(settings, out["gate"]["event"])
    return out


def train(
    cutoff: Annotated[str, typer.Option(help="Train on events received before this date or UTC timestamp.")],
    engine: Annotated[str | None, typer.Option(help="spark or implicit (default: settings.training.engine).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild the version even if the gate already decided it.")] = False,
) -> None:
    """The whole nightly pipeline without Airflow (for development): same steps, same artifacts."""
    from recs.system_cli import settings_or_exit
    from spark_jobs.als import ENGINES
    from spark_jobs.plan import make_plan
    from spark_jobs.quality import DataQualityError

    if engine is not None and engine not in ENGINES:
        raise typer.BadParameter(f"{engine!r} is not one of {', '.join(ENGINES)}", param_hint="--engine")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
    try:
        result = run_all(settings, make_plan(settings, parse_moment(cutoff), engine), force=force)
    except DataQualityError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    gate = result["gate"]
    metrics = {**result.get("evaluate", {}).get("metrics", {}), **result.get("replay", {}).get("metrics", {})}
    typer.echo(json.dumps(metrics, indent=2))
    colour = "green" if gate["published"] else "yellow"
    typer.secho(f"{gate['version']}: {gate['decision']}", fg=colour)


def parse_moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date or timestamp like 2026-11-01", param_hint="--cutoff") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def register(app: typer.Typer) -> None:
    """Add `recs batch train` to the batch layer's command group (spark_jobs/cli.py registers the group)."""
    from spark_jobs.cli import batch_app

    batch_app.command("train")(train)
