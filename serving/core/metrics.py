"""Prometheus metrics of the API.

With several uvicorn workers each process keeps its own counters; `recs serve` sets
PROMETHEUS_MULTIPROC_DIR (emptied at start) before the workers import this module, and
/metrics then aggregates every worker's files through MultiProcessCollector.
"""

from __future__ import annotations

import time
from datetime import datetime

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, Summary, generate_latest

from common.metrics import exposition_registry, mark_process_dead

REQUEST_LATENCY = Histogram(
    "recs_request_seconds",
    "Request latency by route template and status class.",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.008, 0.012, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
CANDIDATES = Histogram(
    "recs_candidates_per_request",
    "Candidates considered per recommendation request (after merging sources).",
    buckets=(0, 10, 25, 50, 100, 200, 300, 500, 1000),
)
FALLBACKS = Counter("recs_fallbacks_total", "Degraded answers by reason.", ["reason"])
# "list": from the person's precomputed top items (common/model.py: BatchTops); "scan": every item scored.
ALS_LISTS = Counter("recs_als_lists_total", "ALS candidate lists by how they were found.", ["found"])
EVENTS = Counter("recs_events_total", "Events received by outcome.", ["outcome"])
IMPRESSIONS_DROPPED = Counter("recs_impressions_dropped_total", "Impressions that could not be written.")
MODEL_LOADS = Counter("recs_model_loads_total", "Model loads by outcome.", ["outcome"])
MODEL_VERSION = Gauge(
    "recs_model_version_info",
    "1 for the model version a worker serves (label), 0 for versions it served before.",
    ["version"],
    multiprocess_mode="liveall",
)
STREAM_LAG = Gauge(
    "recs_stream_lag",
    "Speed-layer consumer group lag, as last seen by a worker.",
    multiprocess_mode="livemax",
)
PUSH_STREAMS = Gauge(
    "recs_push_streams",
    "Open live recommendation streams by transport (sse, websocket).",
    ["transport"],
    multiprocess_mode="livesum",
)
PUSH_COMPUTED = Counter(
    "recs_push_computations_total", "Lists computed for open streams (one serves every stream of the same request)."
)
PUSH_HELPERS_READY = Gauge(
    "recs_push_helpers_ready",
    "Workers whose push helper is up and computing their streams' lists.",
    multiprocess_mode="livesum",
)
PUSH_COMPUTED_BY = Counter(
    "recs_push_helper_lists_total",
    "Pushed lists by where they were computed: the worker's push helper (helper), or the worker while no helper "
    "was up (worker).",
    ["computed_by"],
)
PUSH_COALESCED = Counter(
    "recs_push_coalesced_total", "Changes that found their stream's list already waiting to be computed."
)
PUSHED = Counter("recs_pushed_lists_total", "Lists put in open streams' slots, by transport.", ["transport"])
PUSH_UNCHANGED = Counter(
    "recs_push_unchanged_total", "Lists not pushed: equal to the last one the stream sent, by transport.", ["transport"]
)
PUSH_DROPPED = Counter(
    "recs_push_dropped_total",
    "Pushed lists replaced by a newer one before a slow client took them, by transport.",
    ["transport"],
)

# Where a recommendation request's time goes (sum and count per stage; `recs bench serve` reads the means).
STAGES = ("reads", "candidates", "rules", "features", "ranker", "serialisation")
STAGE_SECONDS = Summary("recs_stage_seconds", "Time spent per stage of GET /v1/recommendations.", ["stage"])
_STAGE_CHILDREN = {stage: STAGE_SECONDS.labels(stage) for stage in STAGES}  # labels() looked up once


class StageClock:
    """One request's time split into STAGES: `lap(stage)` adds the time since the previous lap."""

    __slots__ = ("_last", "spent")

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.spent = dict.fromkeys(STAGES, 0.0)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] += now - self._last
        self._last = now

    def observe(self) -> None:
        """Every stage, zero where the request skipped it, so each mean is per request."""
        for stage, seconds in self.spent.items():
            _STAGE_CHILDREN[stage].observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text of this process, or of all workers in multiprocess mode."""
    return generate_latest(exposition_registry()), CONTENT_TYPE_LATEST


def mark_worker_exit(pid: int) -> None:
    """Drop a dead worker's or push helper's live gauges (called at its shutdown, or its helper's loss)."""
    mark_process_dead(pid)


def set_model_version(version: str, previous: str | None) -> None:
    if previous and previous != version:
        MODEL_VERSION.labels(version=previous).set(0)
    MODEL_VERSION.labels(version=version).set(1)


# ---------------------------------------------------------------- model age (issue 16: metrics and alerts)

MODEL_AGE = Gauge(
    "recs_model_age_seconds",
    "Now minus the served version's data cutoff: how old the newest event the batch layer learnt from is. "
    "Set at each load and each scrape; across workers the most recently set value.",
    multiprocess_mode="livemostrecent",
)


def set_model_age(cutoff: datetime | None) -> None:
    if cutoff is not None:
        MODEL_AGE.set(time.time() - cutoff.timestamp())


# ---------------------------------------------------------------- model drift (the alert rules read these two names)

DRIFT_PSI_MAX = Gauge(
    "recs_model_drift_psi_max",
    "Largest PSI over the ranker's features in the latest drift report of the served version (0 before any).",
    multiprocess_mode="livemostrecent",
)
MODEL_DRIFTED = Gauge(
    "recs_model_drifted",
    "1 when the served version is marked drifted in the registry (models/<version>/DRIFTED), else 0.",
    multiprocess_mode="livemostrecent",
)


def set_drift(psi_max: float, drifted: bool) -> None:
    DRIFT_PSI_MAX.set(psi_max)
    MODEL_DRIFTED.set(1 if drifted else 0)


# ---------------------------------------------------------------- bandit (issue 16)

BANDIT_ALPHA = Gauge(
    "recs_bandit_alpha",
    "Bandit mode: alpha of an arm's Beta posterior (1 + rewarded lists), by experiment, context, arm and reward.",
    ["experiment", "context", "arm", "reward"],
    multiprocess_mode="livemostrecent",
)
BANDIT_BETA = Gauge(
    "recs_bandit_beta",
    "Bandit mode: beta of an arm's Beta posterior (1 + served lists not rewarded).",
    ["experiment", "context", "arm", "reward"],
    multiprocess_mode="livemostrecent",
)
BANDIT_SHARE = Gauge(
    "recs_bandit_share",
    "Bandit mode: the share of new assignments an arm gets now (Thompson probability plus the floor).",
    ["experiment", "context", "arm"],
    multiprocess_mode="livemostrecent",
)
