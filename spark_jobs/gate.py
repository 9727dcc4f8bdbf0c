"""The quality gate: the replay decides.

The nightly run replays its evaluation window [C-E/2, C) through the real stream, speed layer and
serving (`evaluation/gate_replay.py`, as `recs evaluate replay` does) with the candidate's dev model,
which saw no event of the window, and with the serving version on the same targets. A candidate
is published only if
1. its `full` lists (ranker + business rules) are not worse than its own `batch+speed` lists (the
   same model and speed state, the pool scored without the ranker, no rules): the 95 % interval of
   a paired bootstrap over the window's sessions must not lie wholly below 0, for MRR@20 nor for
   HR@20; and
2. its `full` lists are not worse than the serving version's `full` lists by more than the
   tolerance (settings.models.gate_tolerance, a share of the serving version's figure): the upper
   end of the paired interval must not lie below -tolerance x the serving version's figure, for
   MRR@20 nor for HR@20. A non-inferiority test: noise on a thousand sessions does not refuse a
   fresher model, a clear loss does. The comparison leans towards the serving version, whose ALS
   saw events up to its own cutoff while the candidate's dev ALS stops 2E before C.
The serving version is replayed only if its cutoff is not after the window's start: one that was
trained on the window is never scored on it. Then (or when another version became current after
the replay) rule 2 compares the candidate's replay MRR@20 with the serving version's own recorded
one (its gate replay, another window) under the same tolerance, and the decision says so.

The offline evaluation (`spark_jobs/evaluate.py`: the ranker against its pool on the event log,
without rules or Redis, `paired_vs_heuristic`) is still recorded but no longer decides: rule 1
compares the same two lists as serving returns them, rules included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GATE_METRIC = "mrr_at_20"
HIT_METRIC = "hr_at_20"
BOOTSTRAP_ROUNDS = 2000

# The offline evaluation's paired comparison (recorded, not gating): ranker vs its pool without it.
OFFLINE_RANKED = "als_ranker"
OFFLINE_POOL = "heuristic"
PAIRED = "paired_vs_heuristic"

# The replay's entries in a candidate manifest's metrics (written by evaluation/gate_replay.py).
REPLAY_FULL = "replay_full"  # the candidate's full lists: the Scoreboard summary
REPLAY_OWN = "replay_batch+speed"  # the candidate's batch+speed lists
REPLAY_CURRENT = "replay_current_full"  # the serving version's full lists on the same targets
REPLAY_VS_OWN = "replay_paired_vs_batch_speed"  # full - batch+speed: MRR mean/low/high, hr_mean/low/high
REPLAY_VS_CURRENT = "replay_paired_vs_current"  # full - the serving version's full, same shape
REPLAY_ENTRIES = (REPLAY_FULL, REPLAY_OWN, REPLAY_CURRENT, REPLAY_VS_OWN, REPLAY_VS_CURRENT)
REPLAY_PARAMETERS = "gate_replay"  # the manifest's parameters entry: window, the version compared


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


def paired_ranks(
    better: Sequence[int | None], worse: Sequence[int | None], sessions: Sequence[str], seed: int
) -> dict[str, float]:
    """The REPLAY_VS_* entry from two lists' ranks of the same targets (None: missed): the paired
    bootstrap of the reciprocal ranks (MRR@k: mean, low, high, sessions) and of the hits (hr_*)."""
    return paired_reciprocal(_reciprocal(better), _reciprocal(worse), sessions, seed)


def paired_reciprocal(
    better: Sequence[float], worse: Sequence[float], sessions: Sequence[str], seed: int
) -> dict[str, float]:
    """paired_ranks from the targets' reciprocal ranks (0: missed): a target is a hit when it is above 0."""
    mrr = paired_bootstrap(better, worse, sessions, seed)
    hits = paired_bootstrap(_hits_of(better), _hits_of(worse), sessions, seed)
    return {**mrr, **{f"hr_{name}": hits[name] for name in ("mean", "low", "high")}}


def ranker_loss(paired: dict[str, float]) -> str | None:
    """Why a version should order its pool without its ranker, from the offline PAIRED entry (the ranker's
    lists against the same pool's heuristic order on the held-out window); None when it may rank.
    Only a loss beyond noise counts, as in the gate's rule 1: where the ranker is merely not shown to
    win, it ranks (it won on every store measured)."""
    if paired["high"] >= 0 and paired.get("hr_high", 0.0) >= 0:
        return None
    return (
        f"its ranker ordered the held-out window's pools worse than their heuristic order: "
        f"{GATE_METRIC} difference {paired['mean']:+.4f} (95% {paired['low']:+.4f}..{paired['high']:+.4f}), "
        f"{HIT_METRIC} difference {paired.get('hr_mean', 0.0):+.4f} "
        f"(95% {paired.get('hr_low', 0.0):+.4f}..{paired.get('hr_high', 0.0):+.4f}) over {paired['sessions']:.0f} sessions"
    )


def _reciprocal(ranks: Sequence[int | None]) -> list[float]:
    return [1.0 / r if r is not None else 0.0 for r in ranks]


def _hits_of(reciprocal: Sequence[float]) -> list[float]:
    return [1.0 if r > 0 else 0.0 for r in reciprocal]


def decide(
    new: dict[str, dict[str, float]],
    current: dict[str, dict[str, float]] | None,
    current_version: str | None,
    tolerance: float,
    replayed: str | None = None,
) -> Decision:
    """Both rules of the module docstring on the manifests' metrics; `replayed` is the version the
    replay scored beside the candidate (None when it scored none)."""
    full = new.get(REPLAY_FULL, {}).get(GATE_METRIC)
    paired = new.get(REPLAY_VS_OWN)
    if full is None or paired is None:
        return Decision(False, "rejected: the candidate's full and batch+speed lists were not replayed")
    versus_own = _paired_text(paired, full, new.get(REPLAY_OWN, {}))
    if paired["high"] < 0 or paired["hr_high"] < 0:
        return Decision(False, f"rejected: its full lists are worse than its own batch+speed: {versus_own}")
    versus_own = f"replay full vs its own batch+speed: {versus_own}"
    if current_version is None:
        return Decision(True, f"published: first version; {versus_own}")
    verdict = _versus_current(new, current or {}, current_version, tolerance, replayed)
    return Decision(verdict.publish, f"{'published' if verdict.publish else 'rejected'}: {verdict.reason}; {versus_own}")


def _versus_current(
    new: dict[str, dict[str, float]],
    current: dict[str, dict[str, float]],
    current_version: str,
    tolerance: float,
    replayed: str | None,
) -> Decision:
    """Rule 2: paired on the same targets when the serving version was replayed, else its recorded figure."""
    full = new[REPLAY_FULL][GATE_METRIC]
    paired = new.get(REPLAY_VS_CURRENT)
    if replayed == current_version and paired is not None:
        theirs = new.get(REPLAY_CURRENT, {})
        margin = -tolerance * theirs.get(GATE_METRIC, 0.0), -tolerance * theirs.get(HIT_METRIC, 0.0)
        summary = f"replay full vs {current_version}'s full (tolerance {tolerance:.0%}): {_paired_text(paired, full, theirs)}"
        return Decision(paired["high"] >= margin[0] and paired["hr_high"] >= margin[1], summary)
    why = f"{current_version} was not replayed on the window (it was trained on it, or became current after the replay)"
    recorded = current.get(REPLAY_FULL, {}).get(GATE_METRIC)
    if recorded is None:
        return Decision(True, f"{why} and records no replay {GATE_METRIC}: not compared")
    change = (full - recorded) / recorded if recorded else 0.0
    summary = (
        f"{why}: replay {GATE_METRIC} {full:.4f} vs its own recorded {recorded:.4f} on another window "
        f"({change:+.1%}, tolerance {tolerance:.0%})"
    )
    return Decision(full >= recorded * (1.0 - tolerance), summary)


def _paired_text(paired: dict[str, float], value: float, other: dict[str, float]) -> str:
    return (
        f"{GATE_METRIC} {value:.4f} vs {other.get(GATE_METRIC, float('nan')):.4f} "
        f"(difference {paired['mean']:+.4f}, 95% {paired['low']:+.4f}..{paired['high']:+.4f}), "
        f"{HIT_METRIC} difference {paired['hr_mean']:+.4f} (95% {paired['hr_low']:+.4f}..{paired['hr_high']:+.4f}) "
        f"over {paired['sessions']:.0f} sessions"
    )
