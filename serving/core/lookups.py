"""Serving's backend of the gatherer's lookups (`common.gatherer.Lookups`): the speed layer's Redis
state of the request, merged with the model version's batch tables, and the live catalog."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import redis

from common.candidates import Scored
from common.features import POP_DAYS, members
from common.gatherer import ItemColumns
from common.speed_state import SpeedState
from serving.core.catalog_view import UNCATEGORISED, ItemInfo
from serving.core.model_holder import ServingModel
from serving.core.state import ServingState


@dataclass
class ServingLookups:
    state: ServingState
    model: ServingModel
    speed: SpeedState | None  # None when Redis is down: batch tables only
    now_s: float

    def covisitation(self, seeds: Collection[str]) -> Mapping[str, Mapping[str, float]]:
        """The batch table's rows with the speed layer's live weights added on top."""
        live = self.speed.covisitation if self.speed else {}
        batch = self.model.covis
        merged: dict[str, Mapping[str, float]] = {}
        for seed in seeds:
            base, extra = batch.get(seed), live.get(seed)
            if not extra:
                if base:
                    merged[seed] = base  # read only: no copy needed
                continue
            if not base:
                merged[seed] = extra
                continue
            # The batch row, then the live items it lacks in their order; both weights summed where both have one.
            row = dict(base)
            row.update(extra)
            for other in extra.keys() & base.keys():
                row[other] = base[other] + extra[other]
            merged[seed] = row
        return merged

    def trending(self, n: int) -> Scored:
        live = self.speed.trending if self.speed else []
        return (live or self.model.popular)[:n]

    def neighbours(self, session_items: Mapping[str, float], n: int) -> Scored:
        """Scored inside the speed-state read, for the session's recent items (which are `session_items`)."""
        return self.speed.neighbours[:n] if self.speed else []

    def bestsellers(self, categories: Sequence[str], n: int) -> Mapping[str, Mapping[str, float]]:
        """The speed layer read the preferred categories' top n already; the batch table when Redis is down."""
        source = self.speed.category_bestsellers if self.speed else self.model.category_popular
        return {c: dict(list(source[c].items())[:n]) for c in categories if c in source}

    def new_arrivals(self, since_s: float, n: int) -> Scored:
        return [(i.item_id, i.created_at_s) for i in self.state.catalog.newest(since_s, n)]

    def day_counts(self, items: Sequence[str]) -> np.ndarray:
        if self.speed is None:
            return np.zeros((len(items), POP_DAYS))
        try:
            return self.state.day_counts.read(self.state.redis.client, items, self.now_s)
        except redis.RedisError as exc:
            self.state.redis.failed(exc)
            return np.zeros((len(items), POP_DAYS))

    def items(self, items: Sequence[str]) -> ItemColumns:
        return item_columns(self.state, self.speed, items, self.state.catalog.get_many(items), self.now_s)


def item_columns(
    state: ServingState, speed: SpeedState | None, items: Sequence[str], infos: Sequence[ItemInfo | None], now_s: float
) -> ItemColumns:
    """The catalog columns of `items`, from their catalog entries `infos` (looked up by the caller)."""
    unknown = (UNCATEGORISED, 0.0, now_s)
    # One pass over the entries, then each column at C level.
    categories, prices, created_at_s = zip(*[
        (info.category, info.price, info.created_at_s) if info else unknown for info in infos
    ], strict=True) if items else ((), (), ())  # fmt: skip
    return ItemColumns(
        categories=list(categories),
        prices=np.array(prices, dtype=np.float64),
        created_at_s=np.array(created_at_s, dtype=np.float64),
        promoted=promoted_flags(state, speed, items),
    )


def promoted_flags(state: ServingState, speed: SpeedState | None, items: Sequence[str]) -> np.ndarray:
    """Whether each item is promoted, live (the speed layer's set) or in the catalog."""
    live = speed.promoted if speed else frozenset()
    return members(items, live) | members(items, state.catalog.promoted)
