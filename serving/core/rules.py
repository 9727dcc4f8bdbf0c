"""Business rules for served lists, read from a YAML file (settings.api.rules_file) and validated."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Exclusions(_Strict):
    out_of_stock: bool = True
    purchased_within_days: float = Field(1, ge=0)
    in_cart: bool = True
    seen_in_session: bool = False


class Boosts(_Strict):
    promoted: float = Field(0.05, ge=0, le=10)


class NewArrivals(_Strict):
    # Which items are new arrivals (how recent, how many proposed) is part of the version's candidate
    # pool (settings.training.candidates); this only reserves them places in the list.
    reserved_slots: int = Field(1, ge=0, le=50)


class Diversity(_Strict):
    # At most this share of a list's k places for one category (at least one place). Items without a
    # category are never capped: on a catalog without categories the cap must not empty the list.
    max_share_per_category: float = Field(1.0, gt=0, le=1)

    def cap(self, k: int) -> int:
        return max(1, int(self.max_share_per_category * k))


class Rules(_Strict):
    exclude: Exclusions = Exclusions()
    boost: Boosts = Boosts()
    new_arrivals: NewArrivals = NewArrivals()
    diversity: Diversity = Diversity()


def load_rules(path: Path) -> Rules:
    """Rules from the YAML file; the defaults above when it does not exist."""
    if not path.exists():
        return Rules()
    data = yaml.safe_load(path.read_text()) or {}
    return Rules.model_validate(data)
