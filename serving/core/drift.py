"""Drift monitoring in the API: sample served pools for `recs drift report`, export its verdict as gauges.

A share of the ranker-scored lists is appended to the capped stream the report reads (common/drift.py).

Only the ranker variant computes feature rows, so only its lists are sampled, and only with the
page's analytics consent (as impressions), though a sample names no one. A sample is a few
of the pool's rows (drift.rows_per_request), not the whole pool, which keeps an entry at a few KB
and the stream at drift.sample_requests entries across every worker.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

import numpy as np
import redis

from common.drift import log_served, pool_sample
from serving.core import metrics

if TYPE_CHECKING:  # the state holds a DriftProbe
    from serving.core.recommender import RecRequest, RecResult
    from serving.core.state import ServingState

log = logging.getLogger(__name__)


def offer(state: ServingState, req: RecRequest, result: RecResult) -> bool:
    """Log the list at drift.sample_rate; returns whether it was logged. Never fails the request."""
    settings = state.settings.drift
    pool = result.ranked_pool
    if pool is None or result.model_version is None or len(pool.scores) == 0:
        return False
    if random.random() >= settings.sample_rate or not state.redis.available():
        return False
    sample = pool_sample(
        pool.features, pool.scores, settings.rows_per_request, np.random.default_rng(),
        at_s=time.time(), model_version=result.model_version, context=req.context,
        cold_start=pool.cold_start, categories=[item.category for item in result.items],
    )  # fmt: skip
    try:
        log_served(state.redis.client, sample, settings.sample_requests)
    except redis.RedisError as exc:  # a lost sample costs nothing; the breaker spares the next requests
        state.redis.failed(exc)
        return False
    return True


class DriftProbe:
    """The served version's latest drift check and marker, read from the registry at most every `ttl_s`
    per worker (a scrape every few seconds must not list an object store each time)."""

    def __init__(self, ttl_s: float = 30.0) -> None:
        self.ttl_s = ttl_s
        self._read_at = -1e9
        self._version: str | None = None

    def refresh(self, state: ServingState) -> None:
        model = state.models.current
        version = model.version if model is not None else None
        now = time.monotonic()
        if version == self._version and now - self._read_at < self.ttl_s:
            return
        self._version, self._read_at = version, now
        if version is None:
            metrics.set_drift(0.0, False)
            return
        try:
            latest = state.registry.latest_drift(version)
            marked = state.registry.drift_marker(version) is not None
        except (OSError, ValueError):  # an unreadable check must not break the scrape: keep the last values
            log.exception("could not read the drift check of %s", version)
            return
        metrics.set_drift(latest.psi_max if latest else 0.0, marked)
