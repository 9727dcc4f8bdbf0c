"""Business rules for served lists, read from a YAML file (settings.api.rules_file) and validated."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CandidateSizes(_Strict):
    # als..category apply only to versions that do not record their own pool (training.candidates).
    als: int = Field(40, ge=0, le=5000)
    covis: int = Field(20, ge=0, le=5000)
    trending: int = Field(10, ge=0, le=5000)
    category: int = Field(10, ge=0, le=5000)
    new_arrivals: int = Field(20, ge=0, le=5000)


class Exclusions(_Strict):
    out_of_stock: bool = True
    purchased_within_days: float = Field(30, ge=0)
    in_cart: bool = True
    seen_in_session: bool = False


class Boosts(_Strict):
    promoted: float = Field(0.15, ge=0, le=10)


class NewArrivals(_Strict):
    max_age_days: float = Field(14, ge=0)
    reserved_slots: int = Field(1, ge=0, le=50)


class Diversity(_Strict):
    max_per_category: int = Field(3, ge=1)


class Rules(_Strict):
    candidates: CandidateSizes = CandidateSizes()
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
