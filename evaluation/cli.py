"""`recs evaluate replay`: the whole lambda loop replayed over a lake's last days, scored per strategy."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

evaluate_app = typer.Typer(
    help="Evaluate the whole system on recorded traffic (batch + speed + serving).", no_args_is_help=True
)

# report key -> table header
COLUMNS = {
    "hr_at_20": "HR@20",
    "mrr_at_20": "MRR@20",
    "purchase_hr_at_20": "buy HR@20",
    "coverage": "coverage",
    "popularity_percentile": "pop. pct",
    "serve_ms": "ms/list",
}


@evaluate_app.command("replay")
def replay(
    lake: Annotated[Path, typer.Option(help="A lake written by `recs generate` or `recs import`.")],
    test_days: Annotated[int, typer.Option(min=1, help="The last N whole days are the test window.")] = 7,
    strategies: Annotated[
        str,
        typer.Option(
            help="Comma-separated: popular, batch, batch+speed, full, sknn, sr (the default), batch+speed+ranker, "
            "bandit. sknn (session-kNN) and sr (sequential rules) are reference algorithms, not served; bandit "
            "shows one of full, batch+speed, popular per moment (Thompson sampling) and reports its regret."
        ),
    ] = "popular,batch,batch+speed,full,sknn,sr",
    engine: Annotated[
        str, typer.Option(help="ALS engine of the batch layer: implicit or spark.")
    ] = "implicit",
    seed: Annotated[int, typer.Option(help="Seeds training, the speed layer's negatives and sampling.")] = 42,
    warmup_days: Annotated[
        int, typer.Option(min=0, help="Days before the window streamed into the speed layer first.")
    ] = 8,
    max_sessions: Annotated[
        int | None, typer.Option(min=1, help="Score a seeded sample of test sessions (all events replayed).")
    ] = None,
    repeats: Annotated[
        bool,
        typer.Option(help="Also score events whose item occurred earlier in the session (GRU4Rec's count)."),
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes; each replays the window for its share of the strategies.")
    ] = 2,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the model, Redis and work files here (default: a temporary dir)."),
    ] = None,
    content_vectors: Annotated[
        bool,
        typer.Option(help="Give items without a batch vector their content vector (settings.models.content_vectors)."),
    ] = True,
    redis_cluster: Annotated[
        bool,
        typer.Option(
            help="Replay each window on a Redis Cluster of its own (3 masters and 3 replicas on loopback, as "
            "`recs cluster up --redis-cluster` starts) instead of one redis-server."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Train before the window, replay it through stream, speed layer and serving, score next items."""
    from common.settings import SettingsError, get_settings
    from evaluation.protocol import Protocol
    from evaluation.replay import ReplayConfig, run_replay
    from evaluation.strategies import STRATEGY_NAMES

    names = tuple(s.strip() for s in strategies.split(",") if s.strip())
    if not names or any(s not in STRATEGY_NAMES for s in names):
        raise typer.BadParameter(f"choose from {', '.join(STRATEGY_NAMES)}", param_hint="--strategies")
    if engine not in ("implicit", "spark"):
        raise typer.BadParameter("implicit or spark", param_hint="--engine")
    if not lake.exists():
        raise typer.BadParameter(f"{lake} does not exist", param_hint="--lake")
    try:
        settings = get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    settings = settings.model_copy(
        update={"models": settings.models.model_copy(update={"content_vectors": content_vectors})}
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = ReplayConfig(
        lake=str(lake.resolve()), test_days=test_days, strategies=names, engine=engine, seed=seed,
        warmup_days=warmup_days, max_sessions=max_sessions, protocol=Protocol(repeats=repeats), workers=workers,
        redis_cluster=redis_cluster,
    )  # fmt: skip
    say = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    with tempfile.TemporaryDirectory(prefix="recs-replay-") as scratch:
        report = run_replay(config, settings, work_dir or Path(scratch), say=say)
    typer.echo(json.dumps(report, indent=2) if as_json else format_table(report))


def format_table(report: dict[str, Any]) -> str:
    """The strategies as a fixed-width table, with the protocol's counts and the timings under it."""
    lines = [f"{'strategy':<20}" + "".join(f"{header:>10}" for header in COLUMNS.values())]
    for name, row in report["strategies"].items():
        lines.append(f"{name:<20}" + "".join(f"{row[key]:>10}" for key in COLUMNS))
    references = report.get("reference_strategies") or []
    if references:
        lines.append(
            f"{', '.join(references)}: reference algorithms, not the product "
            "(evaluation/references.py: never served, scored on the same targets)"
        )
    counts = report["protocol"]
    lines += [
        "",
        f"window {report['cutoff'][:10]} .. {report['window_end'][:10]} ({report['test_days']} days), "
        f"model {report['model_version']}",
        f"{report['predictions']} next items in {counts['test_sessions_scored']} sessions "
        f"({counts['repeats']} repeats{'' if report['repeats_scored'] else ' not scored'}, "
        f"{counts['purchase_targets']} bought in the session); "
        f"{report['events_replayed']} events replayed after {report['warmup_events']} warm-up events",
        f"train {report['train_s']} s, replay {report['replay_s']} s in {report['workers']} process(es) "
        f"({report['predictions_per_s']} lists/s), "
        + (f"references {report['references_s']} s, " if references else "")
        + f"wall {report['wall_s']} s",
    ]
    if report.get("ranker_unused"):
        lines.append(f"the version ranks without its ranker (full is its pools' heuristic order): {report['ranker_unused']}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add `recs evaluate` to `recs`."""
    app.add_typer(evaluate_app, name="evaluate")
