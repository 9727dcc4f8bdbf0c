"""Candidate generators shared by serving and ranker training, so the ranker learns on what it will rank.

Each generator is a pure function over data its caller gathered (serving from Redis and the
model, training point-in-time from the lake) and returns (item_id, score) pairs, best first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter, mul
from typing import Any, TypeVar

import numpy as np

Scored = list[tuple[str, float]]


@dataclass(frozen=True)
class KnownTop:
    """Where a vector's highest-scoring batch items lie: no batch item outside `rows` (rows of the first
    block of factors) scores above `ceiling`. From the version's precomputed lists (ModelArtifacts.known_top)."""

    rows: np.ndarray
    ceiling: float


def als_top_n(
    user_vector: np.ndarray,
    item_factors: np.ndarray | Sequence[np.ndarray],
    item_ids: Sequence[str],
    n: int,
) -> Scored:
    """Top-n items by dot product (brute force: fine up to a few hundred thousand items), over the
    factors whole or as blocks of rows in order (ModelArtifacts.scan_blocks). The factors' row-major
    layout is as fast to scan as a column-major copy (OpenBLAS's sgemv, 50k x 64, one thread: within
    3 % of each other in 2026-12), so serving keeps no such copy."""
    if n <= 0 or len(item_ids) == 0:
        return []
    scores = item_scores(user_vector, item_factors)
    top = top_n_indices(scores, min(n, len(scores)))
    return list(zip(map(item_ids.__getitem__, top.tolist()), scores[top].tolist(), strict=True))


def als_top_n_listed(
    vector: np.ndarray,
    item_factors: np.ndarray | Sequence[np.ndarray],
    item_ids: Sequence[str],
    n: int,
    known: KnownTop,
) -> Scored | None:
    """`als_top_n`'s answer from `known.rows` and the later blocks' rows (content rows of items new since
    the cutoff: a few, all scored), best first (ties by row), when their n-th highest score beats
    `known.ceiling`; None when it does not (a row outside could be in the top n: scan them all)."""
    blocks = (item_factors,) if isinstance(item_factors, np.ndarray) else tuple(item_factors)
    first, later = blocks[0], blocks[1:]
    rows, scores = known.rows, first[known.rows] @ vector.astype(first.dtype, copy=False)
    if later:
        total = len(first) + sum(len(block) for block in later)
        rows = np.concatenate([rows, np.arange(len(first), total)])
        scores = np.concatenate([scores, *(block @ vector.astype(block.dtype, copy=False) for block in later)])
    if n <= 0 or len(scores) < n:
        return None
    best = np.argpartition(scores, len(scores) - n)[len(scores) - n :]
    if scores[best].min() <= known.ceiling:
        return None
    best = best[np.lexsort((rows[best], -scores[best]))]
    return list(zip(map(item_ids.__getitem__, rows[best].tolist()), scores[best].tolist(), strict=True))


def item_scores(vector: np.ndarray, item_factors: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Every item's dot product with `vector`; `item_factors` whole or as blocks of rows in order."""
    if isinstance(item_factors, np.ndarray):
        return item_factors @ vector.astype(item_factors.dtype, copy=False)
    if len(item_factors) == 1:  # a version without content rows: no copy of 50k scores (~10 µs)
        return item_scores(vector, item_factors[0])
    return np.concatenate([block @ vector.astype(block.dtype, copy=False) for block in item_factors])


PREFILTER_SAMPLE = 2048  # scores sampled to bound the n-th highest from below


def top_n_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest scores, best first: what a partition of every score gives, at a fraction
    of its cost for a few dozen of 50k (0.6 -> 0.06 ms).

    A high value of a fixed random sample is a lower bound of the n-th highest score whenever at least
    n scores reach it; the partition then runs over those few hundred. When fewer reach it (scores
    bunched in a few items the sample missed), over all of them.
    """
    total = len(scores)
    if total >= 8 * PREFILTER_SAMPLE:
        sample = scores[sample_rows(total)]
        above = min(len(sample) - 1, 8 * n * len(sample) // total)  # about 8n scores expected at or over it
        bound = np.partition(sample, len(sample) - 1 - above)[len(sample) - 1 - above]
        candidates = np.flatnonzero(scores >= bound)
        if len(candidates) >= n:
            picked = np.argpartition(scores[candidates], len(candidates) - n)[len(candidates) - n :]
            top = candidates[picked]
            return top[np.argsort(-scores[top], kind="stable")]
    top = np.argpartition(scores, total - n)[total - n :]
    return top[np.argsort(-scores[top], kind="stable")]


@functools.lru_cache(maxsize=8)
def sample_rows(total: int) -> np.ndarray:
    """A fixed random sample of row positions (random, not strided: item order may follow categories)."""
    return np.sort(np.random.default_rng(0).choice(total, PREFILTER_SAMPLE, replace=False))


def covisited(
    session_items: Mapping[str, float],
    covisitation: Mapping[str, Mapping[str, float]],
    n: int,
) -> Scored:
    """Items that followed the session's items, summed, the most recent session item weighted most."""
    return top_scored(covisited_scores(session_items, covisitation), n)


def covisited_scores(
    session_items: Mapping[str, float], covisitation: Mapping[str, Mapping[str, float]]
) -> dict[str, float]:
    """item -> sum over the session's items of (1 / recency rank) x the item's ordered co-visit weight.

    The last item weighs 1, the one before 1/2, ...: with ordered co-visits this generalises
    sequential rules (which read the last item alone) to the whole session.
    """
    # Ties in time broken by item id, so both sides of the gatherer rank seeds the same way.
    ordered = sorted(session_items.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    totals: dict[str, float] = {}
    get = totals.get  # a defaultdict's miss calls float() each time: ~0.6x the time with get
    for rank, (item, _) in enumerate(ordered):
        row = covisitation.get(item)
        if not row:
            continue
        weight = 1.0 / (rank + 1)
        if not totals:  # the first row as it is, weighted at C level
            totals.update(zip(row, map(mul, row.values(), repeat(weight)), strict=True))
            continue
        for other, count in row.items():
            totals[other] = get(other, 0.0) + weight * count
    return totals


def category_best(
    affinity: Mapping[str, float],
    bestsellers: Mapping[str, Mapping[str, float]],
    n: int,
) -> Scored:
    """Bestsellers of the person's preferred categories, shared out by affinity (cold start)."""
    total = sum(v for v in affinity.values() if v > 0)
    if total <= 0 or n <= 0:
        return []
    scores: dict[str, float] = {}
    for category, weight in affinity.items():
        if weight <= 0:
            continue
        share = weight / total
        for item, count in bestsellers.get(category, {}).items():
            score, best = share * count, scores.get(item, 0.0)
            scores[item] = score if score > best else best  # max(best, score) without the builtin's call
    return top_scored(scores, n)


def top_scored(scores: Mapping[str, float], n: int) -> Scored:
    """The n highest (item, score) pairs; ties broken by item id so results are deterministic."""
    if n <= 0:
        return []
    if len(scores) > 2 * n:
        # Sort only the scores at or above the n-th highest (all of its ties kept), not all of them.
        values = np.fromiter(scores.values(), np.float64, len(scores))
        nth = np.partition(values, len(values) - n)[len(values) - n]
        chosen = np.flatnonzero(values >= nth)
        pairs = list(zip(map(list(scores).__getitem__, chosen.tolist()), values[chosen].tolist(), strict=True))
    else:
        pairs = list(scores.items())
    return best_first(pairs)[:n]


RankedRow = TypeVar("RankedRow", bound=tuple[Any, ...])


def best_first(rows: list[RankedRow]) -> list[RankedRow]:
    """`rows` ((item id, score, ...)) sorted in place by score, highest first, ties by item id: two stable
    sorts on C-level keys (the second keeps the first's id order among equal scores), not a Python key
    function per row."""
    rows.sort(key=itemgetter(0))
    rows.sort(key=itemgetter(1), reverse=True)
    return rows


def merge_sources(lists: Mapping[str, Iterable[tuple[str, float]]]) -> dict[str, set[str]]:
    """item -> the sources that proposed it, in first-seen order of `lists`."""
    merged: dict[str, set[str]] = {}
    for source, pairs in lists.items():
        for item, _ in pairs:
            if item in merged:
                merged[item].add(source)
            else:
                merged[item] = {source}
    return merged
