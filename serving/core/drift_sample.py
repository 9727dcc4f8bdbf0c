"""Drift sampling: a share of the ranker-scored lists is appended to the capped stream `recs drift report` reads.

Only the ranker variant computes feature rows, so only its lists are sampled, and only with the
page's analytics consent (as impressions), though a sample names no one. A sample is a few
of the pool's rows (drift.rows_per_request), not the whole pool, which keeps an entry at a few KB
and the stream at drift.sample_requests entries across every worker.
"""

from __future__ import annotations

import random
import time

import numpy as np
import redis

from common.drift import log_served, pool_sample
from serving.core.recommender import RecRequest, RecResult
from serving.core.state import ServingState


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
