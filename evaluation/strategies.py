"""The compared strategies: each one a configuration of the same serving code (variant, rules, speed state),
and the reference algorithms scored next to them (evaluation/references.py), which are not served."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from common.settings import ExperimentSettings, Settings
from evaluation.references import REFERENCES
from serving.core.rules import Boosts, Diversity, Exclusions, NewArrivals, Rules, load_rules


@dataclass(frozen=True)
class Strategy:
    name: str
    variant: str  # serving's experiment variant (serving/core/experiments.py), given to everyone
    speed: bool  # serving reads the speed layer's state; else an empty Redis database (batch only)
    business_rules: bool  # the production rules file; else only its candidate sizes


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("popular", "popular", speed=True, business_rules=False),
        Strategy("batch", "als_only", speed=False, business_rules=False),
        Strategy("batch+speed", "als_only", speed=True, business_rules=False),
        Strategy("full", "ranker", speed=True, business_rules=True),
        # Not in the default set: the ranker without business rules, to tell the two apart.
        Strategy("batch+speed+ranker", "ranker", speed=True, business_rules=False),
    )
}
# Thompson sampling over these served strategies (common/bandit.py): at each moment it shows one arm's
# list; a click is the next item in it. Its process serves every arm, to learn and to measure regret.
BANDIT = "bandit"
BANDIT_ARMS = ("full", "batch+speed", "popular")
# Not served: fitted on the training sessions and scored on the same targets in the main process.
REFERENCE_NAMES = tuple(REFERENCES)  # sknn (session-kNN), sr (sequential rules)
STRATEGY_NAMES = (*STRATEGIES, BANDIT, *REFERENCE_NAMES)  # what --strategies accepts
DEFAULT_STRATEGIES = ("popular", "batch", "batch+speed", "full", "sknn", "sr")
# Relative serving cost of one list (measured on Online Retail), to balance strategies over processes.
SERVE_COST = {"popular": 2.0, "batch": 1.0, "batch+speed": 3.0, "full": 4.0, "batch+speed+ranker": 4.0}
SERVE_COST[BANDIT] = sum(SERVE_COST[arm] for arm in BANDIT_ARMS)


def without_business_rules(rules: Rules) -> Rules:
    """No business rules: no exclusions, boosts, new-arrival slots or category cap (the candidate pool
    belongs to the model version, so it is the same with and without rules)."""
    return Rules(
        exclude=Exclusions(out_of_stock=False, purchased_within_days=0, in_cart=False, seen_in_session=False),
        boost=Boosts(promoted=0.0),
        new_arrivals=NewArrivals(reserved_slots=0),
        diversity=Diversity(max_share_per_category=1.0),
    )


def write_plain_rules(production: Path, target: Path) -> Path:
    """A rules file without business rules, next to the run's other work files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(without_business_rules(load_rules(production)).model_dump()))
    return target


def strategy_settings(base: Settings, strategy: Strategy, plain_rules: Path, redis_url: str) -> Settings:
    """The serving settings of one strategy: everyone in its variant, its rules file, its Redis."""
    rules_file = base.api.rules_file if strategy.business_rules else plain_rules
    return base.model_copy(
        update={
            "experiments": ExperimentSettings(shares={strategy.variant: 1.0}, control=strategy.variant),
            "api": base.api.model_copy(update={"rules_file": rules_file}),
            "redis": base.redis.model_copy(update={"url": redis_url}),
        }
    )
