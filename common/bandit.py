"""Thompson sampling over a fixed set of arms with Beta posteriors and a floor share per arm.

One definition for serving (arms: the experiment's variants, counts from Redis, updated by the speed
layer) and the replay evaluation (arms: served strategies, counts in memory). A posterior is over the
rate of one reward per served list: `click` (the list got a click, counted once per list) or
`purchase` (a purchase in the session after a click on the list, once per clicked list), with a
uniform Beta(1, 1) prior: alpha = 1 + rewarded lists, beta = 1 + lists served − rewarded lists.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONTEXTS = ("home", "product", "cart")
REWARDS = ("click", "purchase")
SERVED = "n"  # the count of served lists, beside the reward counts
PRIOR = (1.0, 1.0)


@dataclass(frozen=True)
class Beta:
    alpha: float = PRIOR[0]
    beta: float = PRIOR[1]

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


def posterior(served: float, rewarded: float) -> Beta:
    """The Beta posterior of a reward rate after `rewarded` of `served` lists (clipped: a reward counted
    before its impression reached the speed layer must not make beta fall below the prior)."""
    rewarded = min(max(rewarded, 0.0), max(served, 0.0))
    return Beta(PRIOR[0] + rewarded, PRIOR[1] + max(served, 0.0) - rewarded)


def count_field(context: str, arm: str, what: str) -> str:
    """The field of an experiment's count hash (redis_keys.bandit_counts): `what` is SERVED or a reward."""
    return f"{context}:{arm}:{what}"


def experiment_version(arms: Iterable[str], epoch: int = 1) -> str:
    """Names the posteriors of one arm set: a changed set (or a new epoch) starts from the prior."""
    digest = hashlib.sha256(",".join(sorted(arms)).encode()).hexdigest()[:10]
    return f"{epoch}-{digest}"


class Counts:
    """Served lists and rewards per (context, arm), as the count hash holds them."""

    def __init__(self, raw: Mapping[str, float] | None = None) -> None:
        self.raw: dict[str, float] = dict(raw or {})

    @classmethod
    def from_redis(cls, reply: Mapping[bytes, bytes]) -> Counts:
        return cls({k.decode(): float(v) for k, v in reply.items()})

    def add(self, context: str, arm: str, what: str, by: float = 1.0) -> None:
        key = count_field(context, arm, what)
        self.raw[key] = self.raw.get(key, 0.0) + by

    def get(self, context: str, arm: str, what: str) -> float:
        return self.raw.get(count_field(context, arm, what), 0.0)

    def posterior(self, context: str, arm: str, reward: str) -> Beta:
        return posterior(self.get(context, arm, SERVED), self.get(context, arm, reward))

    def posteriors(self, context: str, arms: Sequence[str], reward: str) -> dict[str, Beta]:
        return {arm: self.posterior(context, arm, reward) for arm in arms}


def choose(posteriors: Mapping[str, Beta], floor: float, rng: random.Random) -> str:
    """Thompson sampling with a floor: with probability floor·n an arm drawn uniformly (each arm then
    gets at least `floor` of the traffic), else the arm whose Beta draw is highest."""
    arms = sorted(posteriors)
    if rng.random() < floor * len(arms):
        return arms[rng.randrange(len(arms))]
    draws = [(rng.betavariate(posteriors[a].alpha, posteriors[a].beta), a) for a in arms]
    return max(draws)[1]


def shares(
    posteriors: Mapping[str, Beta], floor: float, draws: int = 4000, seed: int = 0
) -> dict[str, float]:
    """Each arm's expected share of traffic under `choose` (its Thompson probability, Monte Carlo, with
    the floor's uniform part added)."""
    arms = sorted(posteriors)
    if not arms:
        return {}
    rng = np.random.default_rng(seed)
    samples = rng.beta(
        [posteriors[a].alpha for a in arms], [posteriors[a].beta for a in arms], size=(draws, len(arms))
    )
    best = np.bincount(samples.argmax(axis=1), minlength=len(arms)) / draws
    explore = floor * len(arms)
    return {arm: float(floor + (1.0 - explore) * p) for arm, p in zip(arms, best, strict=True)}


def served_record(counts_key: str, context: str, arm: str) -> str:
    """The value of redis_keys.bandit_served (and session_clicked): the count hash and the two reward
    fields of the list's context and arm, so the speed layer needs no settings to count them."""
    return "\n".join((counts_key, count_field(context, arm, "click"), count_field(context, arm, "purchase")))
