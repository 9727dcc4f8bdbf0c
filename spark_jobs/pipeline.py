"""The batch layer's steps of the nightly run as plain functions, one per DAG task: validate, erase,
interactions, ALS, ranker, evaluate, gate/publish, notify. The gate's replay step, which serves the
candidate through the other layers, lives in evaluation/gate_replay.py; the DAG and `recs batch train`
(recs/nightly.py) run them all in order.

Steps hand over through files (the run's work directory and the registry version), so each one
can be retried alone. A version that the gate already decided is never rebuilt: re-running a date
changes nothing (`force` rebuilds it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.lake import Lake
from common.model import (
    load_item_factors,
    load_model,
    save_content_map,
    save_factors,
    save_history,
    save_ranker,
    save_table,
)
from common.registry import COVISITATION, POPULARITY, Manifest, Registry
from common.settings import PROJECT_ROOT, Settings, redacted
from spark_jobs import tables
from spark_jobs.plan import DEV_MODEL, STAGES, Plan, work_root

if TYPE_CHECKING:
    from spark_jobs.ranker import Rows

log = logging.getLogger(__name__)
DONE = ("published", "rejected")


def registry_of(settings: Settings) -> Registry:
    return Registry(settings.models.root)


def stage_model(plan: Plan, settings: Settings, stage: str) -> tuple[Registry, str]:
    """Where a stage's model lives: the dev model in the run's work registry, the final one as the version."""
    return (Registry(str(plan.dev_registry)), DEV_MODEL) if stage == "dev" else (registry_of(settings), plan.version)


def lake_of(settings: Settings) -> Lake:
    return Lake(settings.lake.root)


def decided(plan: Plan, settings: Settings) -> Manifest | None:
    """The version's manifest if the gate has already published or rejected it."""
    registry = registry_of(settings)
    if plan.version not in registry.versions():
        return None
    manifest = registry.read_manifest(plan.version)
    return manifest if manifest.status in DONE else None


def reset(plan: Plan, settings: Settings) -> None:
    """Forget a version and its work files, so the next run rebuilds it (`--force`)."""
    registry = registry_of(settings)
    if registry.fs.exists(registry.version_dir(plan.version)):
        if registry.current() == plan.version:
            raise RuntimeError(f"{plan.version} is serving; activate another version before rebuilding it")
        registry.fs.rm(registry.version_dir(plan.version), recursive=True)
    shutil.rmtree(plan.work_dir, ignore_errors=True)


# ---------------------------------------------------------------- steps


def validate(settings: Settings, cutoff: datetime) -> dict[str, Any]:
    from spark_jobs.quality import validate_events

    reports = validate_events(lake_of(settings), cutoff, settings.training.volume_factor)
    return {"partitions": len(reports), "events": sum(r.rows for r in reports)}


def erase(settings: Settings) -> dict[str, Any]:
    """Erase the queued people from the lake and every model version. The runs' work directories are
    tables and models derived from the lake, so they go too: a run rebuilds what it needs, and a
    decided version is never rebuilt."""
    from spark_jobs.erasure import apply_erasures

    report = apply_erasures(lake_of(settings), [registry_of(settings)])
    if report.users:
        shutil.rmtree(work_root(settings), ignore_errors=True)
    return {
        "users": len(report.users),
        "rows_removed": report.rows_removed,
        "partitions": report.partitions_rewritten,
        "factor_rows_forgotten": report.factor_rows_forgotten,
    }


def build_interactions(plan: Plan, settings: Settings) -> dict[str, Any]:
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    clock = time.perf_counter()
    if plan.engine == "spark":
        spark_submit(plan, settings, "interactions")
    else:
        from spark_jobs.interactions import local_interactions

        for stage in STAGES:
            table = local_interactions(lake_of(settings), plan.stage_cutoff(stage), settings.training)
            target = plan.interactions_dir(stage)
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            pq.write_table(table, target / "part-0.parquet")
    rows = {f"{s}_interactions": pq.read_table(plan.interactions_dir(s)).num_rows for s in STAGES}
    _record(plan, {**rows, "interactions_s": round(time.perf_counter() - clock, 2)})
    return rows


def train_als(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Fit the dev and the final ALS, each with its person history and its popularity and co-visitation
    tables (serving needs them: the gate replays the dev model through serving)."""
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    registry = registry_of(settings)
    clock = time.perf_counter()
    if plan.engine == "spark":
        spark_submit(plan, settings, "als")
    else:
        from spark_jobs.als import fit_implicit

        for stage in STAGES:
            factors = fit_implicit(pq.read_table(plan.interactions_dir(stage)), settings.training)
            target, version = stage_model(plan, settings, stage)
            save_factors(
                target, version, factors.user_ids, factors.user_factors, factors.item_ids, factors.item_factors,
                top_items=settings.training.top_items_kept,
            )
    fit_s = round(time.perf_counter() - clock, 2)
    for stage in STAGES:
        target, version = stage_model(plan, settings, stage)
        save_history(target, version, pq.read_table(plan.interactions_dir(stage)), settings.training.history_kept)
    lake = lake_of(settings)
    before_dev = lake.read_events(end=plan.dev_cutoff, columns=tables.SEQUENCE_COLUMNS)
    _save_tables(Registry(str(plan.dev_registry)), DEV_MODEL, before_dev, settings)
    _write_dev_manifest(plan, settings)
    events = lake.read_events(end=plan.cutoff, columns=tables.SEQUENCE_COLUMNS)
    _save_tables(registry, plan.version, events, settings)
    _record(plan, {"als_fit_s": fit_s, "events": events.num_rows})
    return {"version": plan.version, "als_fit_s": fit_s}


def _save_tables(registry: Registry, version: str, events: pa.Table, settings: Settings) -> None:
    """The popularity and ordered co-visitation tables of `events` (a version's training events)."""
    save_table(registry, version, POPULARITY, tables.popularity(events))
    speed = settings.speed
    covis = tables.covisitation(events, speed.covis_top_n, speed.covis_steps, speed.recent_items)
    save_table(registry, version, COVISITATION, covis)


def train_content_map(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Fit the map from item content to item factors for the dev and the final ALS (common/content.py),
    after measuring it on held-out items; items new since a cutoff get their vectors from it."""
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    from common.content import content_of_row, fit_content_map

    clock = time.perf_counter()
    catalog = {row["item_id"]: content_of_row(row) for row in lake_of(settings).read_catalog().to_pylist()}
    summary: dict[str, Any] = {}
    for stage in STAGES:
        target, version = stage_model(plan, settings, stage)
        item_ids, item_factors = load_item_factors(target, version)
        rows = [i for i, item in enumerate(item_ids) if item in catalog and catalog[item].has_text]
        contents = [catalog[item_ids[i]] for i in rows]
        factors = item_factors[rows]
        content_map, figures = fit_content_map(contents, factors, settings.training.seed)
        if stage == "final":
            summary = {"content_items": len(rows), **figures}
        save_content_map(target, version, content_map)
        if stage == "dev":
            target.write_manifest(target.read_manifest(version))  # its hashes now cover the map
    summary["content_map_s"] = round(time.perf_counter() - clock, 2)
    _record(plan, summary)
    return summary


def ranker_rows(plan: Plan, settings: Settings) -> dict[str, Rows]:
    """The ranker's training and validation rows: the dev model's pools and features at sampled moments of
    each window, as serving would have built them then."""
    from spark_jobs.ranker import feature_rows
    from spark_jobs.replay import PointInTime, build_requests, load_log

    training = settings.training
    log_ = load_log(lake_of(settings), plan.cutoff, training)
    dev = load_model(Registry(str(plan.dev_registry)), DEV_MODEL)
    # One point in time carried from the first window into the next, which follows it: a second one
    # would count the whole log up to its first moment again (the co-visits, the session neighbours).
    pit = PointInTime.at(
        log_, dev, training, settings.speed, plan.train_window[0].timestamp(), settings.models.content_vectors
    )
    rows = {}
    for name, (start, end) in (("train", plan.train_window), ("valid", plan.valid_window)):
        requests = build_requests(log_, start.timestamp(), end.timestamp(), training.max_requests, training.seed)
        rows[name] = feature_rows(pit, requests)
    return rows


def train_ranker(plan: Plan, settings: Settings) -> dict[str, Any]:
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    from spark_jobs.ranker import train_ranker as fit

    clock = time.perf_counter()
    training = settings.training
    rows = ranker_rows(plan, settings)
    booster = fit(rows["train"], rows["valid"], training.seed)
    save_ranker(registry_of(settings), plan.version, booster)
    _save_drift_baseline(registry_of(settings), plan.version, rows["train"], booster, settings)
    save_ranker(Registry(str(plan.dev_registry)), DEV_MODEL, booster)
    summary = {
        "ranker_requests": rows["train"].requests,
        "ranker_rows": len(rows["train"].labels),
        "valid_requests": rows["valid"].requests,
        "ranker_best_iteration": int(booster.best_iteration or booster.current_iteration()),
        "ranker_s": round(time.perf_counter() - clock, 2),
    }
    _record(plan, summary)
    return summary


def _save_drift_baseline(registry: Registry, version: str, train: Rows, booster: Any, settings: Settings) -> None:
    """A bounded sample of the training rows, scored by the new ranker: what drift reports compare serving with."""
    from common.drift import save_baseline, training_sample

    scores = booster.predict(train.features) if train.requests else np.zeros(0)
    samples = training_sample(
        train.features, scores, train.groups, train.categories, train.cold_start, train.at_s,
        settings.drift, settings.training.seed,
    )  # fmt: skip
    save_baseline(registry, version, samples)


def evaluate(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Offline metrics of popularity, ALS, the pool without and with the ranker on the held-out window,
    and their paired comparison, into a candidate manifest (recorded; the replay step's figures decide).
    A ranker that orders the window's pools worse than their heuristic order, beyond noise, is left
    unused (the manifests' `ranker_unused`, the dev model's too): serving then ranks by that order."""
    if decided(plan, settings):
        return {"skipped": f"{plan.version} already decided"}
    from spark_jobs.evaluate import evaluate as measure
    from spark_jobs.gate import OFFLINE_POOL, OFFLINE_RANKED, PAIRED, paired_reciprocal, ranker_loss
    from spark_jobs.ranker import PARAMS
    from spark_jobs.replay import PointInTime, build_requests, load_log

    clock = time.perf_counter()
    training = settings.training
    start, end = plan.eval_window
    log_ = load_log(lake_of(settings), plan.cutoff, training)
    dev = load_model(Registry(str(plan.dev_registry)), DEV_MODEL)
    pit = PointInTime.at(log_, dev, training, settings.speed, start.timestamp(), settings.models.content_vectors)
    requests = build_requests(log_, start.timestamp(), end.timestamp(), training.max_requests, training.seed + 1)
    metrics, reciprocal = measure(pit, requests, dev.ranker)
    sessions = [str(log_.session[r.at]) for r in requests]
    metrics[PAIRED] = paired_reciprocal(reciprocal[OFFLINE_RANKED], reciprocal[OFFLINE_POOL], sessions, training.seed)
    ranker_unused = ranker_loss(metrics[PAIRED]) if dev.ranker is not None else None
    if ranker_unused:
        log.warning("version %s serves without its ranker: %s", plan.version, ranker_unused)
    _set_ranker_unused(Registry(str(plan.dev_registry)), DEV_MODEL, ranker_unused)  # the gate serves the dev model
    state = {**_state(plan), "eval_requests": len(requests), "evaluate_s": round(time.perf_counter() - clock, 2)}
    registry = registry_of(settings)
    manifest = Manifest(
        version=plan.version,
        created_at=datetime.now(UTC),
        cutoff=plan.cutoff,
        engine=plan.engine,
        parameters={
            "training": training.model_dump(),
            "windows": plan.windows(),
            "ranker": {k: v for k, v in PARAMS.items() if k != "verbose"},
            "spark_master": settings.spark.master if plan.engine == "spark" else None,
        },
        metrics={**metrics, **_content_metrics(state)},
        counts={k: int(v) for k, v in state.items() if isinstance(v, int)},
        ranker_unused=ranker_unused,
    )
    registry.write_manifest(manifest)
    _record(plan, {"eval_requests": len(requests)})
    return {"version": plan.version, "metrics": metrics, "ranker_unused": ranker_unused}


def _set_ranker_unused(registry: Registry, version: str, why: str | None) -> None:
    manifest = registry.read_manifest(version)
    if manifest.ranker_unused != why:  # a rewrite hashes every artifact again
        registry.write_manifest(manifest.model_copy(update={"ranker_unused": why}))


def gate_and_publish(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Publish (switch CURRENT) or reject the candidate; returns the decision and the event to send."""
    from spark_jobs.gate import REPLAY_PARAMETERS, decide

    registry = registry_of(settings)
    done = decided(plan, settings)
    if done is not None:
        return {"version": plan.version, "published": done.status == "published", "decision": done.decision, "event": None}
    manifest = registry.read_manifest(plan.version)
    registry.verify(plan.version)
    current = registry.current()
    baseline = registry.read_manifest(current).metrics if current else None
    replayed = manifest.parameters.get(REPLAY_PARAMETERS, {}).get("current")
    decision = decide(manifest.metrics, baseline, current, settings.models.gate_tolerance, replayed)
    if manifest.ranker_unused:
        decision = replace(decision, reason=f"{decision.reason}; serves without its ranker: {manifest.ranker_unused}")
    if not decision.publish:
        registry.reject(plan.version, decision.reason)
        log.warning("gate: %s", decision.reason)
        return {"version": plan.version, "published": False, "decision": decision.reason, "event": None}
    registry.write_bytes(
        registry.path(plan.version, "manifest.json"),
        manifest.model_copy(update={"decision": decision.reason}).model_dump_json(indent=2).encode(),
    )
    event = registry.activate(plan.version, kind="published")
    log.info("gate: %s", decision.reason)
    return {"version": plan.version, "published": True, "decision": decision.reason, "event": event.model_dump_json()}


def notify(settings: Settings, event_json: str | None) -> bool:
    """Publish the model event on Redis pub/sub; a Redis that is down is logged, never fatal."""
    if not event_json:
        return False
    import redis

    from common.messages import ModelEvent
    from common.redis_server import connect
    from common.registry import publish_model_event

    try:
        client = connect(settings.redis.effective_url, timeout_s=settings.redis.socket_timeout_s)
        heard = publish_model_event(client, ModelEvent.model_validate_json(event_json))
        log.info("model event sent to %d subscriber(s)", heard)
        return True
    except redis.RedisError as exc:
        log.warning(
            "could not tell serving about the new model (Redis at %s): %s", redacted(settings.redis.effective_url), exc
        )
        return False


# ---------------------------------------------------------------- Spark and bookkeeping


def spark_submit(plan: Plan, settings: Settings, stage: str) -> None:
    """Run one stage of spark_jobs/train_als.py under spark-submit on settings.spark.master."""
    binary = Path(sys.executable).with_name("spark-submit")
    command = [
        str(binary if binary.exists() else shutil.which("spark-submit") or "spark-submit"),
        "--master", settings.spark.master,
        "--driver-memory", settings.spark.driver_memory,
        "--executor-memory", settings.spark.executor_memory,
        "--conf", f"spark.sql.shuffle.partitions={settings.spark.shuffle_partitions}",
        # Also here, not only in the session: driver JVM options and jars take effect only at launch.
        *[arg for key, value in settings.spark.conf.items() for arg in ("--conf", f"{key}={value}")],
        str(PROJECT_ROOT / "spark_jobs" / "train_als.py"),
        "--stage", stage,
        "--cutoff", plan.cutoff.isoformat(),
        "--work", str(plan.work_dir),
        "--lake", settings.lake.root,
        "--models", settings.models.root,
        "--training", settings.training.model_dump_json(),
        "--spark", settings.spark.model_dump_json(),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).splitlines()[-40:])
        raise RuntimeError(f"spark-submit {stage} failed (exit {done.returncode}):\n{tail}")


def _write_dev_manifest(plan: Plan, settings: Settings) -> None:
    """The dev model's manifest, with the training parameters serving reads (pool sizes, alpha), as
    the final version's has: the gate serves the dev model as the final one will be served."""
    dev = Registry(str(plan.dev_registry))
    dev.write_manifest(
        Manifest(
            version=DEV_MODEL,
            created_at=datetime.now(UTC),
            cutoff=plan.dev_cutoff,
            engine=plan.engine,
            parameters={"training": settings.training.model_dump()},
        )
    )


def _content_metrics(state: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The content map's held-out figures (train_content_map), beside the offline metrics."""
    names = ("holdout_cosine", "mean_vector_cosine", "holdout_items", "holdout_norm_ratio", "holdout_scaled_norm_ratio")
    found = {name: float(state[name]) for name in names if name in state}
    return {"content_map": found} if found else {}


def _state(plan: Plan) -> dict[str, Any]:
    return json.loads(plan.state_file.read_text()) if plan.state_file.exists() else {}


def _record(plan: Plan, values: dict[str, Any]) -> None:
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    plan.state_file.write_text(json.dumps({**_state(plan), **values}, indent=2))
