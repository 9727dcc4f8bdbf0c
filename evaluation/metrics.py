"""Next-item metrics of served lists: HR@k, MRR@k, HR@k on purchased items, coverage, popularity bias."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from scipy.stats import rankdata


def rank_of(item: str, ranked: Sequence[str], k: int) -> int | None:
    """1-based position of `item` in the top k of `ranked`, None when it is not there."""
    for position, candidate in enumerate(ranked[:k], start=1):
        if candidate == item:
            return position
    return None


def hit_rate(ranks: Sequence[int | None]) -> float:
    """Share of predictions whose target was in the list (HR@k, also called Recall@k for one target)."""
    return sum(r is not None for r in ranks) / len(ranks) if ranks else 0.0


def mean_reciprocal_rank(ranks: Sequence[int | None]) -> float:
    """Mean of 1/rank, counting a miss as 0 (MRR@k)."""
    return sum(1.0 / r for r in ranks if r is not None) / len(ranks) if ranks else 0.0


def popularity_percentiles(counts: Mapping[str, float]) -> dict[str, float]:
    """item -> its popularity percentile among the items (0 least, 1 most popular; ties share a mid-rank)."""
    if not counts:
        return {}
    items = list(counts)
    ranks = rankdata([counts[i] for i in items], method="average")
    n = len(items)
    return {item: float((r - 1) / (n - 1)) if n > 1 else 1.0 for item, r in zip(items, ranks, strict=True)}


@dataclass
class Scoreboard:
    """One strategy's predictions, accumulated as the replay goes."""

    k: int
    catalog_size: int  # items the batch model knows: the denominator of coverage
    percentile: Mapping[str, float]  # item -> popularity percentile in training
    ranks: list[int | None] = field(default_factory=list)
    purchase_ranks: list[int | None] = field(default_factory=list)
    new_item_ranks: list[int | None] = field(default_factory=list)  # targets with no batch vector at the cutoff
    shown: Counter[str] = field(default_factory=Counter)
    degraded: int = 0

    def add(
        self, ranked: Sequence[str], target: str, purchased: bool, degraded: bool = False, new_item: bool = False
    ) -> None:
        rank = rank_of(target, ranked, self.k)
        self.ranks.append(rank)
        if purchased:
            self.purchase_ranks.append(rank)
        if new_item:
            self.new_item_ranks.append(rank)
        self.shown.update(ranked[: self.k])
        self.degraded += degraded

    def summary(self) -> dict[str, float | int]:
        slots = sum(self.shown.values())
        pop = sum(self.percentile.get(i, 0.0) * n for i, n in self.shown.items()) / slots if slots else 0.0
        return {
            f"hr_at_{self.k}": round(hit_rate(self.ranks), 4),
            f"mrr_at_{self.k}": round(mean_reciprocal_rank(self.ranks), 4),
            f"purchase_hr_at_{self.k}": round(hit_rate(self.purchase_ranks), 4),
            "coverage": round(len(self.shown) / self.catalog_size, 4) if self.catalog_size else 0.0,
            "popularity_percentile": round(pop, 4),
            "predictions": len(self.ranks),
            "purchase_predictions": len(self.purchase_ranks),
            f"new_item_hr_at_{self.k}": round(hit_rate(self.new_item_ranks), 4),
            f"new_item_mrr_at_{self.k}": round(mean_reciprocal_rank(self.new_item_ranks), 4),
            "new_item_predictions": len(self.new_item_ranks),
            "mean_list_length": round(slots / len(self.ranks), 2) if self.ranks else 0.0,
            "degraded": self.degraded,
        }
