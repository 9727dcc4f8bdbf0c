"""Prometheus exposition shared by every process: the multiprocess switch, the registry a scrape reads,
a metrics port for processes that serve no HTTP of their own, and a histogram that takes a batch at once.

A process tree whose children each keep counters (uvicorn workers, `recs speed run --consumers N`)
sets PROMETHEUS_MULTIPROC_DIR, emptied, before any child imports prometheus_client; each child then
writes its values to files there and a scrape sums them through MultiProcessCollector.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Histogram, start_http_server

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir(directory: Path) -> None:
    """Make this process's children write their metrics under `directory` (emptied first); call it
    before any child starts."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(directory)


def exposition_registry() -> CollectorRegistry:
    """What a scrape of this process reads: every child's files in multiprocess mode, else its own metrics."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def mark_process_dead(pid: int) -> None:
    """Drop a dead child's live gauges (its counters and histograms stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve_metrics(host: str, port: int) -> WSGIServer | None:
    """Expose GET /metrics on host:port from a daemon thread; None when port is 0 (off) or taken.

    A taken port is logged, not fatal: the process's work matters more than its metrics, and the
    scrape target's `up` (alert TargetDown) shows the gap."""
    if port == 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=host, registry=exposition_registry())
    except OSError as exc:
        log.error("cannot expose metrics on %s:%d (%s); this process runs without them", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server


class BatchHistogram(Histogram):
    """A histogram that also observes a batch of values in one step: one bucket search for the batch
    (numpy) and one increment a bucket, instead of a lock and a linear search a value; the speed layer
    observes the freshness of every event it applies."""

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        self._raise_if_not_observable()
        amounts = np.asarray(values, dtype=np.float64)
        amounts = amounts[~np.isnan(amounts)]
        if amounts.size == 0:
            return
        bounds = np.asarray(self._upper_bounds, dtype=np.float64)
        # side="left": the first bound >= the value, as observe's `amount <= bound`.
        counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
        self._sum.inc(float(amounts.sum()))
        for bucket, count in zip(self._buckets, counts.tolist(), strict=True):
            if count:
                bucket.inc(count)
