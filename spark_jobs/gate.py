"""The quality gate. A candidate version is published only if
1. its ranked lists are not worse than its own candidate pool scored without the ranker (`heuristic`,
   serving's als_only): a paired bootstrap over sessions of the held-out window, 95 %, must not
   find the ranker's MRR@20 lower; and
2. its ranker's MRR@20 is not below the serving version's by more than the tolerance
   (settings.models.gate_tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GATE_STRATEGY = "als_ranker"
GATE_BASELINE = "heuristic"  # the same pool without the ranker: the ranker must not make it worse
GATE_METRIC = "mrr_at_20"
PAIRED = "paired_vs_heuristic"  # the manifest's metrics entry holding the bootstrap's result
BOOTSTRAP_ROUNDS = 2000


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str


def paired_bootstrap(
    better: Sequence[float], worse: Sequence[float], sessions: Sequence[str], seed: int, rounds: int = BOOTSTRAP_ROUNDS
) -> dict[str, float]:
    """Mean per-request difference better - worse, with a 95 % interval from resampling whole sessions
    (requests of one session are not independent)."""
    diff = np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)
    if len(diff) == 0:
        return {"mean": 0.0, "low": 0.0, "high": 0.0, "sessions": 0.0}
    _, group = np.unique(np.asarray(sessions, dtype=object), return_inverse=True)
    sums = np.bincount(group, weights=diff)
    sizes = np.bincount(group).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(rounds, len(sums)))
    means = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "sessions": float(len(sums))}


def decide(
    new: dict[str, dict[str, float]],
    current: dict[str, dict[str, float]] | None,
    current_version: str | None,
    tolerance: float,
) -> Decision:
    """Both rules of the module docstring, on the metrics the evaluate step wrote into the manifests."""
    value = new.get(GATE_STRATEGY, {}).get(GATE_METRIC)
    if value is None:
        return Decision(False, f"no {GATE_STRATEGY} {GATE_METRIC} was measured")
    paired = new.get(PAIRED)
    if paired is None:
        return Decision(False, f"no paired comparison of {GATE_STRATEGY} with {GATE_BASELINE} was measured")
    own = new.get(GATE_BASELINE, {}).get(GATE_METRIC, 0.0)
    versus_own = (
        f"{GATE_METRIC} {value:.4f} vs {own:.4f} without the ranker "
        f"(difference {paired['mean']:+.4f}, 95% {paired['low']:+.4f}..{paired['high']:+.4f} over {paired['sessions']:.0f} sessions)"
    )
    if paired["high"] < 0:
        return Decision(False, f"rejected: the ranker makes lists worse than its candidates: {versus_own}")
    if current_version is None:
        return Decision(True, f"first version: {versus_own}")
    baseline = (current or {}).get(GATE_STRATEGY, {}).get(GATE_METRIC)
    if baseline is None:
        return Decision(True, f"{current_version} has no {GATE_METRIC} to compare with; {versus_own}")
    floor = baseline * (1.0 - tolerance)
    change = (value - baseline) / baseline if baseline else 0.0
    summary = f"{GATE_METRIC} {value:.4f} vs {baseline:.4f} of {current_version} ({change:+.1%}, tolerance {tolerance:.0%}); {versus_own}"
    if value < floor:
        return Decision(False, f"rejected: {summary}")
    return Decision(True, f"published: {summary}")
