"""The quality gate: a new version is published unless its NDCG@20 is worse than the serving one's
by more than the tolerance (settings.models.gate_tolerance)."""

from __future__ import annotations

from dataclasses import dataclass

GATE_STRATEGY = "als_ranker"
GATE_METRIC = "ndcg_at_20"


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str


def decide(
    new: dict[str, dict[str, float]],
    current: dict[str, dict[str, float]] | None,
    current_version: str | None,
    tolerance: float,
) -> Decision:
    """Compare the gate metric of the candidate with the serving version's."""
    value = new.get(GATE_STRATEGY, {}).get(GATE_METRIC)
    if value is None:
        return Decision(False, f"no {GATE_STRATEGY} {GATE_METRIC} was measured")
    if current_version is None:
        return Decision(True, f"first version: {GATE_METRIC} {value:.4f}")
    baseline = (current or {}).get(GATE_STRATEGY, {}).get(GATE_METRIC)
    if baseline is None:
        return Decision(True, f"{current_version} has no {GATE_METRIC} to compare with; {GATE_METRIC} {value:.4f}")
    floor = baseline * (1.0 - tolerance)
    change = (value - baseline) / baseline if baseline else 0.0
    summary = f"{GATE_METRIC} {value:.4f} vs {baseline:.4f} of {current_version} ({change:+.1%}, tolerance {tolerance:.0%})"
    if value < floor:
        return Decision(False, f"rejected: {summary}")
    return Decision(True, f"published: {summary}")
