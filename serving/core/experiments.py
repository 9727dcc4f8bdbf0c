"""Experiment assignment: a fixed hash share (A/B: a person's variant is a pure function of their id and
the shares), or a Thompson-sampling bandit over the same variants (`Bandit`)."""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections.abc import Mapping
from typing import cast

import redis

from common import bandit, redis_keys
from common.settings import ExperimentSettings
from serving.core import metrics

# Changing the salt reshuffles everyone; keep it fixed for the life of an experiment.
SALT = "lambdarec-exp-1"


def bucket(person_id: str) -> float:
    """A uniform number in [0, 1) fixed for the person."""
    digest = hashlib.sha256(f"{SALT}:{person_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(person_id: str, shares: Mapping[str, float]) -> str:
    """The variant whose cumulative share interval holds the person's bucket (variants in name order)."""
    point = bucket(person_id)
    cumulative = 0.0
    ordered = sorted(shares.items())
    for name, share in ordered:
        cumulative += share
        if point < cumulative:
            return name
    return ordered[-1][0]  # float rounding at the top end


class Bandit:
    """Bandit mode of the experiment (settings `experiments.mode`): Thompson sampling over the variants per
    context on the counts the speed layer keeps (redis_keys.bandit_counts), read at most once per
    `experiments.cache_s` by a worker. An arm is sticky per person and session (redis_keys.session_arms);
    each served list is recorded for the speed layer to count (`record`)."""

    def __init__(self, settings: ExperimentSettings, session_ttl_s: int, seed: int | None = None) -> None:
        self.settings = settings
        self.session_ttl_s = session_ttl_s
        self.arms = sorted(settings.shares)
        self.version = bandit.experiment_version(self.arms, settings.epoch)
        self.counts_key = redis_keys.bandit_counts(settings.name, self.version)
        self.rng = random.Random(seed)
        self._counts = bandit.Counts()
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def counts(self, client: redis.Redis) -> bandit.Counts:
        """The counts, re-read when the cached ones are older than experiments.cache_s."""
        now = time.monotonic()
        if now - self._read_at >= self.settings.cache_s:
            reply = cast(dict[bytes, bytes], client.hgetall(self.counts_key))
            with self._lock:
                self._counts, self._read_at = bandit.Counts.from_redis(reply), now
        return self._counts

    def arm(
        self, client: redis.Redis, person_id: str, session_id: str | None, context: str, sticky: bool
    ) -> str:
        """The person's arm in this context: the one given earlier in the session, else a Thompson draw
        (kept for the session when `sticky`: a person who did not consent to personalisation has nothing stored)."""
        key = redis_keys.session_arms(person_id, session_id) if sticky and session_id else None
        field = f"{self.settings.name}:{self.version}:{context}"
        if key is not None:
            given = cast(bytes | None, client.hget(key, field))
            if given is not None and given.decode() in self.settings.shares:
                return given.decode()
        posteriors = self.counts(client).posteriors(context, self.arms, self.settings.reward)
        with self._lock:  # random.Random is not safe to share between threads
            chosen = bandit.choose(posteriors, self.settings.floor, self.rng)
        if key is None:
            return chosen
        pipe = client.pipeline(transaction=False)
        pipe.hsetnx(key, field, chosen)  # a concurrent request of the session may have won: take its arm
        pipe.expire(key, self.session_ttl_s)
        pipe.hget(key, field)
        kept = cast(bytes | None, pipe.execute()[-1])
        return kept.decode() if kept is not None else chosen

    def record(self, client: redis.Redis, request_id: str, context: str, arm: str) -> None:
        """Leave the served list where the speed layer counts it: the record its click looks up, and an
        entry of the impression stream."""
        pipe = client.pipeline(transaction=False)
        pipe.set(
            redis_keys.bandit_served(request_id),
            bandit.served_record(self.counts_key, context, arm),
            ex=self.session_ttl_s,
        )
        pipe.xadd(
            redis_keys.BANDIT_IMPRESSIONS,
            {"counts": self.counts_key, "field": bandit.count_field(context, arm, bandit.SERVED)},
            maxlen=self.settings.impressions_kept,
            approximate=True,
        )
        pipe.execute()

    def export(self, client: redis.Redis) -> None:
        """Set the posterior gauges (metrics.BANDIT_*) from Redis: called on a scrape of /metrics."""
        self._read_at = -math.inf
        counts, name = self.counts(client), self.settings.name
        for context in bandit.CONTEXTS:
            for reward in bandit.REWARDS:
                for arm, beta in counts.posteriors(context, self.arms, reward).items():
                    metrics.BANDIT_ALPHA.labels(name, context, arm, reward).set(beta.alpha)
                    metrics.BANDIT_BETA.labels(name, context, arm, reward).set(beta.beta)
            sampled = counts.posteriors(context, self.arms, self.settings.reward)
            for arm, share in bandit.shares(sampled, self.settings.floor).items():
                metrics.BANDIT_SHARE.labels(name, context, arm).set(share)
