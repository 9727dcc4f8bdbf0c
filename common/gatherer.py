"""The one candidate and feature gatherer: serving, ranker training and the offline evaluation all call it.

Candidate sources, pool sizes and the feature inputs are computed here, from a small set of
lookups (`Lookups`) that each side backs with its own store: serving with Redis and the model
files (serving/core/recommender.py), training with the event log at a moment (spark_jobs/replay.py).
Only the lookups differ, so what the ranker learns on is what it ranks.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Protocol

import numpy as np

from common.candidates import (
    KnownTop,
    Scored,
    als_top_n,
    als_top_n_listed,
    category_best,
    covisited_scores,
    merge_sources,
    top_scored,
)
from common.features import DAY_S, Candidates, RequestState
from common.model import ModelArtifacts
from common.settings import CandidatePool
from common.vectors import unit_rows

# Bestsellers are read for the session's this many preferred categories (serving's one Redis read
# fetches exactly these).
TOP_AFFINITY_CATEGORIES = 3


@dataclass(frozen=True)
class ItemColumns:
    """Catalog columns of N items, aligned by position."""

    categories: list[str]
    prices: np.ndarray
    created_at_s: np.ndarray
    promoted: np.ndarray  # bool


class Lookups(Protocol):
    """What the gatherer reads at one moment."""

    def covisitation(self, seeds: Collection[str]) -> Mapping[str, Mapping[str, float]]:
        """seed -> other -> ordered co-visit weight (common/sequence.py), each row its top covis_top_n."""
        ...

    def trending(self, n: int) -> Scored: ...

    def neighbours(self, session_items: Mapping[str, float], n: int) -> Scored:
        """Session-kNN's list for the session's recent items (common/neighbours.py)."""
        ...

    def bestsellers(self, categories: Sequence[str], n: int) -> Mapping[str, Mapping[str, float]]:
        """category -> its top n items -> weight, for the given categories."""
        ...

    def new_arrivals(self, since_s: float, n: int) -> Scored:
        """Items created at or after since_s, newest first (score: creation time)."""
        ...

    def day_counts(self, items: Sequence[str]) -> np.ndarray:
        """len(items) x POP_DAYS event counts per UTC day up to the moment (features.Candidates.day_counts)."""
        ...

    def items(self, items: Sequence[str]) -> ItemColumns: ...


@dataclass
class Gathered:
    """The candidate lists of one request, and the co-visit scores every feature row reads."""

    lists: dict[str, Scored]
    covis_scores: dict[str, float]  # item -> recency-weighted ordered co-visits of the seeds
    covis_last: dict[str, float]  # item -> ordered co-visit weight from the most recent seed alone
    neighbour_scores: dict[str, float]  # item -> session-kNN score (its list only)
    seeds: list[str] = field(default_factory=list)  # the seeds, most recent first (ties by id, as covis_last)
    # How the ALS list was found: "list" (the person's precomputed top items), "scan" (every item), None (no list).
    als_found: str | None = None


def gather_lists(
    model: ModelArtifacts,
    lookups: Lookups,
    state: RequestState,
    sizes: CandidatePool,
    seeds: Mapping[str, float],
    *,
    anchor: str | None = None,
    personal: bool = True,
) -> Gathered:
    """Every source's list, each of its fixed pool size.

    `seeds`: item -> recency, the items whose followers become candidates (the session's items, and
    the product page's or the cart's where serving asks for those). `anchor`: a product page's item,
    whose ALS neighbours join the ALS list. `personal` False gives the non-personal pool (trending
    and new arrivals only).
    """
    lists: dict[str, Scored] = {}
    covis_scores: dict[str, float] = {}
    covis_last: dict[str, float] = {}
    neighbour_scores: dict[str, float] = {}
    ordered: list[str] = []
    als_found = None
    if personal:
        if state.user_vector is not None:
            lists["als"], als_found = _als_list(model, state.user_vector, state.user_top, sizes.als)
        if anchor is not None:
            similar = model.similar_items(anchor, sizes.als // 2)
            if similar is not None:
                lists["als"] = _union(lists.get("als", []), similar)
        rows = lookups.covisitation(list(seeds))
        covis_scores = covisited_scores(seeds, rows)
        ordered = sorted(seeds, key=lambda i: (seeds[i], i), reverse=True)
        if ordered:
            covis_last = dict(rows.get(ordered[0], {}))
        lists["covis"] = top_scored(covis_scores, sizes.covis)
        if sizes.next > 0:
            lists["next"] = top_scored(covis_last, sizes.next)
        if sizes.neighbours > 0 and state.session_items:
            lists["neighbours"] = lookups.neighbours(state.session_items, sizes.neighbours)
            neighbour_scores = dict(lists["neighbours"])
        preferred = preferred_categories(state.category_affinity)
        bestsellers = lookups.bestsellers(preferred, sizes.category) if preferred else {}
        lists["category"] = category_best(state.category_affinity, bestsellers, sizes.category)
        if sizes.history > 0:
            lists["history"] = earlier_items(state, covis_scores, sizes.history)
    lists["trending"] = lookups.trending(sizes.trending)
    since = state.now_s - sizes.new_max_age_days * DAY_S
    lists["new"] = lookups.new_arrivals(since, sizes.new_arrivals)
    return Gathered(lists, covis_scores, covis_last, neighbour_scores, ordered, als_found)


def _als_list(model: ModelArtifacts, vector: np.ndarray, known: KnownTop | None, n: int) -> tuple[Scored, str]:
    """The ALS top n of `vector` and how it was found: from the person's precomputed top items ("list")
    when they settle it, else by scoring every item ("scan"); the same answer either way."""
    if known is not None:
        listed = als_top_n_listed(vector, model.scan_blocks, model.item_ids, n, known)
        if listed is not None:
            return listed, "list"
    return als_top_n(vector, model.scan_blocks, model.item_ids, n), "scan"


def earlier_items(state: RequestState, covis_scores: Mapping[str, float], n: int) -> Scored:
    """The person's history that is not in the session: first what follows the session's items (by the
    co-visit score), then the most sessions, then the most recent (ties by id); scored by sessions."""
    ranked = sorted(state.history.items(), key=lambda kv: (-covis_scores.get(kv[0], 0.0), -kv[1][0], -kv[1][1], kv[0]))
    return [(item, sessions) for item, (sessions, _) in ranked if item not in state.session_items][:n]


def describe(
    model: ModelArtifacts,
    lookups: Lookups,
    gathered: Gathered,
    item_ids: list[str],
    sources: list[set[str]],
    info: ItemColumns | None = None,
) -> Candidates:
    """The feature inputs of the pool `item_ids` (after serving's rules, or all of `gathered` in training);
    `info`: the pool's catalog columns when the caller has them (`lookups.items(item_ids)`'s)."""
    info = lookups.items(item_ids) if info is None else info
    vectors = item_vectors(model, item_ids)
    last_cosine, session_cosine = seed_cosines(vectors, item_vectors(model, gathered.seeds))
    return Candidates(
        item_ids=item_ids,
        sources=sources,
        item_vectors=vectors,
        day_counts=lookups.day_counts(item_ids),
        covis=_column(gathered.covis_scores, item_ids),
        covis_last=_column(gathered.covis_last, item_ids),
        neighbours=_column(gathered.neighbour_scores, item_ids),
        last_seed_cosine=last_cosine,
        seeds_cosine=session_cosine,
        categories=info.categories,
        prices=info.prices,
        created_at_s=info.created_at_s,
        promoted=info.promoted,
    )


def seed_cosines(vectors: np.ndarray, seed_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's cosine with the most recent seed's vector, and with the mean direction of every
    seed's (`seed_vectors`, most recent first); 0 where a vector is missing (a row of zeros)."""
    n = len(vectors)
    unit = unit_rows(vectors)
    seeds = unit_rows(seed_vectors)
    if n == 0 or len(seeds) == 0:
        return np.zeros(n, np.float64), np.zeros(n, np.float64)
    last = unit @ seeds[0]
    centre = unit_rows(seeds.sum(axis=0, keepdims=True))[0]
    return last.astype(np.float64), (unit @ centre).astype(np.float64)


def _column(values: Mapping[str, float], item_ids: Sequence[str]) -> np.ndarray:
    """values[i] for each item, 0 where absent."""
    return np.fromiter(map(values.get, item_ids, repeat(0.0)), np.float64, len(item_ids))


def preferred_categories(affinity: Mapping[str, float]) -> list[str]:
    """The categories with the highest positive affinity, best first (ties by name)."""
    positive = [(c, w) for c, w in affinity.items() if w > 0]
    return [c for c, _ in sorted(positive, key=lambda cw: (-cw[1], cw[0]))[:TOP_AFFINITY_CATEGORIES]]


def rank_scores(pairs: Scored) -> dict[str, float]:
    """A source's list as ranks mapped to (0, 1]: the first item 1, the last close to 0."""
    n = len(pairs)
    return {item: 1.0 - rank / n for rank, (item, _) in enumerate(pairs)}


def heuristic_scores(
    model: ModelArtifacts,
    source_ranks: Mapping[str, Mapping[str, float]],
    item_ids: Sequence[str],
    vector: np.ndarray | None,
) -> np.ndarray:
    """The ranker-free score of a pool: every source's rank score (`rank_scores` of its list) summed,
    plus the ALS score where there is a vector (serving's als_only variant; the yardstick the ranker
    must beat)."""
    total = np.zeros(len(item_ids), dtype=np.float64)
    for ranks in source_ranks.values():
        total += _column(ranks, item_ids)
    if vector is not None and len(item_ids):
        total += item_vectors(model, item_ids) @ vector.astype(np.float32)
    return total


def pool(gathered: Gathered) -> tuple[list[str], list[set[str]]]:
    """Every candidate once, with the sources that proposed it (training's pool: no rules)."""
    merged = merge_sources(gathered.lists)
    return list(merged), list(merged.values())


def item_vectors(model: ModelArtifacts, item_ids: Sequence[str]) -> np.ndarray:
    """N x factors; rows of zeros for items the model does not know."""
    index = model.item_index
    rows = np.fromiter(map(index.get, item_ids, repeat(-1)), np.int64, len(item_ids))
    vectors = model.item_factors[np.maximum(rows, 0)] if len(rows) else np.zeros((0, model.factors), np.float32)
    vectors[rows < 0] = 0.0  # fancy indexing copied, so the model's factors are untouched
    return vectors


def _union(first: Scored, second: Scored) -> Scored:
    seen = {i for i, _ in first}
    return first + [(i, s) for i, s in second if i not in seen]
