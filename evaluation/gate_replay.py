"""The gate's replay: the nightly run's candidate, and the serving version beside it, replayed over the
evaluation window [C-E/2, C) through the stream, the speed layer and serving's `recommend` as
`recs evaluate replay` does, scored target by target for the rules of spark_jobs/gate.py.

The candidate is the run's dev model (ALS on events before C-2E, the ranker trained and early-stopped
before the window), so it is never scored on events it was trained on; the events between its
cutoff and the window reach the speed layer with it active and become its deltas, as live. The
version the run publishes is the same ranker with the ALS refit on everything before C. The serving
version is replayed only if its cutoff is not after the window's start (else it was trained on the
window; the gate then falls back to its recorded figure and says so).

Cost: every event of the window and of the POP_DAYS before it goes through the speed layer once per
replayed model (two processes when both are); serving is asked only at the targets of at most
settings.models.gate_sessions sampled sessions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common.lake import Lake
from common.model import ModelArtifacts, load_model
from common.registry import Registry
from common.settings import Settings
from evaluation.protocol import TestSet, mark_new_items, sample_sessions, select_targets
from evaluation.replay import (
    ReplayConfig,
    WindowJob,
    protocol_events,
    replay_windows,
    time_offset,
    training_percentiles,
)
from spark_jobs.gate import (
    REPLAY_CURRENT,
    REPLAY_ENTRIES,
    REPLAY_FULL,
    REPLAY_OWN,
    REPLAY_PARAMETERS,
    REPLAY_VS_CURRENT,
    REPLAY_VS_OWN,
    paired_ranks,
)
from spark_jobs.pipeline import decided, lake_of, registry_of
from spark_jobs.plan import DEV_MODEL, Plan

log = logging.getLogger(__name__)

FULL, OWN = "full", "batch+speed"


@dataclass(frozen=True)
class Replayed:
    """A model version to replay, where it lives, and which strategies to serve with it."""

    registry: str
    version: str
    strategies: tuple[str, ...]


def replay_gate(plan: Plan, settings: Settings) -> dict[str, Any]:
    """The nightly step between evaluate and gate_and_publish: replay the candidate (and the serving
    version) and put the figures into the candidate's manifest, replacing any a failed try left."""
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    clock = time.perf_counter()
    registry = registry_of(settings)
    start, end = plan.eval_window
    current, note = beside(registry, start)
    candidate = Replayed(str(plan.dev_registry), DEV_MODEL, (FULL, OWN))
    work_dir = plan.work_dir / "gate-replay"
    metrics, counts = replay_metrics(settings, lake_of(settings), (start, end), candidate, current, work_dir)
    compared = current.version if current else None
    measured = {"window": f"{start.isoformat()}..{end.isoformat()}", "current": compared, "note": note}
    record(registry, plan.version, metrics, counts, measured)
    replay_s = round(time.perf_counter() - clock, 2)
    log.info("gate replay of %s in %.1f s: %s", plan.version, replay_s, note)
    return {"version": plan.version, "metrics": metrics, "replay_s": replay_s, "current": compared, "note": note}


def record(
    registry: Registry, version: str, metrics: dict[str, dict[str, float]], counts: dict[str, int], measured: dict[str, Any]
) -> None:
    """Put the replay's figures into the candidate's manifest; those of an earlier try are replaced
    whole (a serving version replayed then may not be now), so a retried step leaves one answer."""
    manifest = registry.read_manifest(version)
    kept = {name: value for name, value in manifest.metrics.items() if name not in REPLAY_ENTRIES}
    registry.write_manifest(
        manifest.model_copy(
            update={
                "metrics": {**kept, **metrics},
                "parameters": {**manifest.parameters, REPLAY_PARAMETERS: measured},
                "counts": {**manifest.counts, **counts},
            }
        )
    )


def beside(registry: Registry, window_start: datetime) -> tuple[Replayed | None, str]:
    """The serving version to replay beside the candidate (None when there is none, or when its cutoff
    is after the window's start: it was trained on the window), and why."""
    version = registry.current()
    if version is None:
        return None, "no serving version to compare with"
    cutoff = registry.read_manifest(version).cutoff
    if cutoff > window_start:
        return None, (
            f"{version} was not replayed: its cutoff {cutoff:%Y-%m-%d %H:%M} is after the window's start "
            f"{window_start:%Y-%m-%d %H:%M}, so it was trained on the window"
        )
    return Replayed(registry.root_url, version, (FULL,)), f"{version} replayed on the same targets"


def replay_metrics(
    settings: Settings,
    lake: Lake,
    window: tuple[datetime, datetime],
    candidate: Replayed,
    current: Replayed | None,
    work_dir: Path,
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Replay [start, end) once per model on the same sampled targets; returns the manifest's replay
    entries (spark_jobs.gate.REPLAY_*) and the test set's counts."""
    start, end = window
    models = [m for m in (candidate, current) if m is not None]
    loaded = [load_model(Registry(m.registry), m.version) for m in models]
    config = ReplayConfig(
        lake=lake.root_url, strategies=(FULL, OWN), seed=settings.training.seed, max_sessions=settings.models.gate_sessions
    )
    test = gate_targets(lake, window, loaded, config)
    offset_s = time_offset((start - timedelta(days=config.warmup_days)).timestamp(), time.time())
    percentile = training_percentiles(loaded[0].popularity)
    jobs = [
        WindowJob(
            config, _with_registry(settings, model.registry), model.version, start, end, offset_s, model.strategies,
            test, percentile, work_dir / f"model-{i}", model_cutoff=artifacts.manifest.cutoff,
        )  # fmt: skip
        for i, (model, artifacts) in enumerate(zip(models, loaded, strict=True))
    ]
    results = replay_windows(jobs)
    ranks = [_ranks_by_target(result, test) for result in results]
    sessions = test.targets["session_id"].astype(str).tolist()
    seed = settings.training.seed
    metrics = {
        REPLAY_FULL: _summary(results[0], FULL),
        REPLAY_OWN: _summary(results[0], OWN),
        REPLAY_VS_OWN: paired_ranks(ranks[0][FULL], ranks[0][OWN], sessions, seed),
    }
    if current is not None:
        metrics[REPLAY_CURRENT] = _summary(results[1], FULL)
        metrics[REPLAY_VS_CURRENT] = paired_ranks(ranks[0][FULL], ranks[1][FULL], sessions, seed)
    counts = {"replay_targets": len(test.targets), "replay_sessions": test.targets["session_id"].nunique()}
    return metrics, counts


def gate_targets(lake: Lake, window: tuple[datetime, datetime], models: list[ModelArtifacts], config: ReplayConfig) -> TestSet:
    """The window's targets on items every replayed model was trained on (so each can be scored on
    each), from at most config.max_sessions sampled sessions."""
    start, end = window
    known = set.intersection(*(set(m.item_ids) for m in models))
    test = select_targets(protocol_events(lake, end), start.timestamp(), known, config.protocol)
    return mark_new_items(sample_sessions(test, config.max_sessions, config.seed), known)


def _ranks_by_target(result: dict[str, Any], test: TestSet) -> dict[str, list[int | None]]:
    """strategy -> its rank of each of the test set's targets, in the test set's order."""
    position = {event_id: i for i, event_id in enumerate(result["targets"])}
    order = [position[event_id] for event_id in test.targets["event_id"]]
    return {name: [ranks[i] for i in order] for name, ranks in result["ranks"].items()}


def _summary(result: dict[str, Any], strategy: str) -> dict[str, float]:
    """A strategy's Scoreboard figures; not its serving time, which a retry would change."""
    return {name: float(value) for name, value in result["strategies"][strategy].items() if name != "serve_ms"}


def _with_registry(settings: Settings, root: str) -> Settings:
    return settings.model_copy(update={"models": settings.models.model_copy(update={"root": root})})
