"""The replay's `bandit` strategy: Thompson sampling over served strategies, with the serving bandit's
code (common/bandit.py), learning from simulated clicks and measured against the best fixed arm.

At each asked moment every arm's list is computed (the replay serves them anyway); the bandit shows
one, drawn from its posteriors, and is rewarded when the list holds the recorded next item (the hit the
scoreboard counts: a simulated click). It learns only from the arm it showed; the other arms' hits
give the counterfactual: regret = hits of the best fixed arm over the run − the bandit's hits.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common import bandit
from evaluation.metrics import rank_of

CONTEXT = "home"


@dataclass
class ReplayBandit:
    arms: tuple[str, ...]
    k: int
    floor: float = 0.05
    seed: int = 42
    counts: bandit.Counts = field(default_factory=bandit.Counts)
    hits: dict[str, int] = field(default_factory=dict)  # every arm's hits, shown or not
    shown: dict[str, int] = field(default_factory=dict)
    rewarded: int = 0
    asked: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.hits = dict.fromkeys(self.arms, 0)
        self.shown = dict.fromkeys(self.arms, 0)

    def choose(self) -> str:
        return bandit.choose(self.counts.posteriors(CONTEXT, self.arms, "click"), self.floor, self.rng)

    def step(self, lists: Mapping[str, Sequence[str]], target: str) -> str:
        """Show one arm's list for the moment whose next item is `target`; returns the arm."""
        arm = self.choose()
        hit = {a: rank_of(target, lists[a], self.k) is not None for a in self.arms}
        for a, h in hit.items():
            self.hits[a] += h
        self.counts.add(CONTEXT, arm, bandit.SERVED)
        if hit[arm]:
            self.counts.add(CONTEXT, arm, "click")
            self.rewarded += 1
        self.shown[arm] += 1
        self.asked += 1
        return arm

    def summary(self) -> dict[str, Any]:
        best = max(self.arms, key=lambda a: (self.hits[a], a))
        regret = self.hits[best] - self.rewarded
        return {
            "arms": {
                a: {
                    "share": round(self.shown[a] / self.asked, 4) if self.asked else 0.0,
                    "fixed_hits": self.hits[a],
                    "posterior_mean": round(self.counts.posterior(CONTEXT, a, "click").mean, 4),
                }
                for a in self.arms
            },
            "floor": self.floor,
            "best_fixed_arm": best,
            "hits": self.rewarded,
            "regret": regret,
            "regret_per_target": round(regret / self.asked, 4) if self.asked else 0.0,
        }
