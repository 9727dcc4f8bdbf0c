"""Ranker features: the one definition used for training (point-in-time, from the lake) and serving.

A feature row describes one (person, candidate item, moment). Callers gather the raw inputs
into a `RequestState` and `Candidates` — training from lake events before the moment,
serving from Redis and the model artifacts — and `compute_features` turns them into the
matrix LightGBM sees. Nothing here reads a store, so both sides compute the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from common.candidates import KnownTop
from common.settings import TrainingSettings

# Where a candidate came from; a candidate may come from several generators.
# "next": what follows the session's most recent item (sequential rules); "covis": what follows any of its items;
# "history": what the person engaged with before the version's cutoff, or bought since (`with_purchases_since`).
SOURCES = ("als", "covis", "next", "neighbours", "trending", "category", "new", "history")

FEATURE_NAMES: tuple[str, ...] = (
    "als_score",
    *(f"src_{s}" for s in SOURCES),
    "pop_1d",
    "pop_7d",
    "trend",
    "covis",
    "covis_last",
    "neighbours",
    # The same three as shares of the request's best: comparable across sessions and seeds of any popularity.
    "covis_share",
    "covis_last_share",
    "neighbours_share",
    # Cosine of the candidate's vector with the most recent seed's, and with the seeds' mean direction.
    "last_seed_cosine",
    "seeds_cosine",
    "session_items",
    "category_affinity",
    "price_ratio",
    "item_age_days",
    "seen_in_session",
    "in_cart",
    "bought_before",
    # The person's history (RequestState.history): sessions with the item (log1p), days since the last.
    "history_sessions",
    "history_age_days",
    "promoted",
)

DAY_S = 86_400.0
POP_DAYS = 8  # per-day counts for day(t)-7 .. day(t), oldest first

_COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}
_SOURCE_COLUMN = {source: _COLUMN[f"src_{source}"] for source in SOURCES}


@dataclass
class RequestState:
    """What is known about the person at the moment of the request."""

    now_s: float  # epoch seconds
    user_vector: np.ndarray | None = None  # batch vector + speed delta, or fold-in
    # Where user_vector's top batch items lie (serving: the version's precomputed lists); None: score every item.
    user_top: KnownTop | None = None
    session_items: Mapping[str, float] = field(default_factory=dict)  # item -> last event time (s)
    category_affinity: Mapping[str, float] = field(default_factory=dict)  # decayed, any scale
    cart: frozenset[str] = frozenset()
    purchases: Mapping[str, float] = field(default_factory=dict)  # item -> last purchase time (s), recent ones
    typical_price: float | None = None  # median price of items the person engaged with
    # item -> (sessions, last engaged, epoch s): the version's (ModelArtifacts.history_of) and purchases since
    history: Mapping[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class Candidates:
    """Column data for N candidate items, aligned by position."""

    item_ids: list[str]
    sources: list[set[str]]
    item_vectors: np.ndarray | None  # N x k; rows of zeros for items the model does not know
    day_counts: np.ndarray  # N x POP_DAYS event counts per UTC day, only events before now
    covis: np.ndarray  # N: ordered co-visits of the session's items, recency-weighted (candidates.covisited_scores)
    covis_last: np.ndarray  # N: ordered co-visit weight from the session's most recent item alone
    neighbours: np.ndarray  # N: session-kNN score (common/neighbours.py), 0 outside its list
    last_seed_cosine: np.ndarray  # N: cosine with the most recent seed's vector (gatherer.seed_cosines)
    seeds_cosine: np.ndarray  # N: cosine with the seeds' mean direction
    categories: list[str]
    prices: np.ndarray  # N
    created_at_s: np.ndarray  # N, epoch seconds
    promoted: np.ndarray  # N, bool

    def __len__(self) -> int:
        return len(self.item_ids)


def compute_features(state: RequestState, cands: Candidates) -> np.ndarray:
    """The N x len(FEATURE_NAMES) float32 matrix, columns in FEATURE_NAMES order."""
    n = len(cands)
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    col = _COLUMN

    if state.user_vector is not None and cands.item_vectors is not None:
        out[:, col["als_score"]] = cands.item_vectors @ state.user_vector
    # The source flags in one pass over the pool (a candidate has one or two sources of the seven), as
    # positions in the flattened matrix.
    width = len(FEATURE_NAMES)
    row_starts = range(0, n * width, width)
    flagged = [start + _SOURCE_COLUMN[s] for start, sources in zip(row_starts, cands.sources, strict=True) for s in sources]
    out.reshape(-1)[flagged] = 1.0

    pop_1d, pop_7d = sliding_popularity(cands.day_counts, state.now_s)
    out[:, col["pop_1d"]] = np.log1p(pop_1d)
    out[:, col["pop_7d"]] = np.log1p(pop_7d)
    out[:, col["trend"]] = pop_1d / (pop_7d / 7.0 + 1.0)
    out[:, col["covis"]] = np.log1p(cands.covis)
    out[:, col["covis_last"]] = np.log1p(cands.covis_last)
    out[:, col["neighbours"]] = cands.neighbours
    for name, values in (("covis", cands.covis), ("covis_last", cands.covis_last), ("neighbours", cands.neighbours)):
        out[:, col[f"{name}_share"]] = _share_of_max(values)
    out[:, col["last_seed_cosine"]] = cands.last_seed_cosine
    out[:, col["seeds_cosine"]] = cands.seeds_cosine
    out[:, col["session_items"]] = len(state.session_items)

    affinity = normalised_affinity(state.category_affinity)
    out[:, col["category_affinity"]] = np.fromiter(map(affinity.get, cands.categories, repeat(0.0)), np.float64, n)
    if state.typical_price and state.typical_price > 0:
        out[:, col["price_ratio"]] = cands.prices / state.typical_price
    else:
        out[:, col["price_ratio"]] = 1.0
    out[:, col["item_age_days"]] = np.maximum(0.0, (state.now_s - cands.created_at_s) / DAY_S)
    out[:, col["seen_in_session"]] = members(cands.item_ids, state.session_items)
    out[:, col["in_cart"]] = members(cands.item_ids, state.cart)
    out[:, col["bought_before"]] = members(cands.item_ids, state.purchases)
    out[:, col["promoted"]] = cands.promoted
    out[:, col["history_sessions"]], out[:, col["history_age_days"]] = history_columns(state, cands.item_ids)
    return out


def with_purchases_since(
    history: Mapping[str, tuple[float, float]], purchases: Mapping[str, float], since_s: float
) -> dict[str, tuple[float, float]]:
    """The version's history of a person joined with their purchases since its cutoff (the speed layer's):
    an item bought since counts one session more, and its last time is the purchase's."""
    merged = dict(history)
    for item, at in purchases.items():
        if at >= since_s:
            sessions, last = merged.get(item, (0.0, -math.inf))
            merged[item] = (sessions + 1.0, max(last, at))
    return merged


# history_age_days of an item the person has no history with: older than any real age, so one split parts them.
NO_HISTORY_DAYS = 10_000.0


def history_columns(state: RequestState, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """log1p(sessions) and days since the last engagement, of each item in the person's history."""
    sessions = np.zeros(len(item_ids), np.float64)
    age_days = np.full(len(item_ids), NO_HISTORY_DAYS)
    for i, seen in enumerate(map(state.history.get, item_ids)):
        if seen is not None:
            sessions[i] = math.log1p(seen[0])
            age_days[i] = max(0.0, state.now_s - seen[1]) / DAY_S
    return sessions, age_days


def members(item_ids: Sequence[str], group: Collection[str]) -> np.ndarray:
    """Whether each item is in `group`, at C level (map of its `in`)."""
    return np.fromiter(map(group.__contains__, item_ids), bool, len(item_ids))


def _share_of_max(values: np.ndarray) -> np.ndarray:
    best = float(np.max(values)) if len(values) else 0.0
    return values / best if best > 0 else np.zeros_like(values)


def sliding_popularity(day_counts: np.ndarray, now_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Approximate trailing 24 h and 7 day counts from per-day buckets (oldest first, today last).

    Yesterday's (and the 8th day's) bucket counts by the share of it still inside the window,
    so the value slides smoothly instead of dropping at midnight.
    """
    counts = np.asarray(day_counts, dtype=np.float64).reshape(-1, POP_DAYS)
    elapsed = (now_s % DAY_S) / DAY_S
    pop_1d = counts[:, -1] + counts[:, -2] * (1.0 - elapsed)
    pop_7d = counts[:, -7:].sum(axis=1) + counts[:, 0] * (1.0 - elapsed)
    return pop_1d, pop_7d


def normalised_affinity(affinity: Mapping[str, float]) -> dict[str, float]:
    """Category affinity as shares of the total (0..1)."""
    total = sum(v for v in affinity.values() if v > 0)
    if total <= 0:
        return {}
    return {k: v / total for k, v in affinity.items() if v > 0}


def decay(value: float, age_s: float, half_life_s: float) -> float:
    """Exponential decay by age."""
    return value * math.pow(0.5, max(0.0, age_s) / half_life_s)


def implicit_weight(event_type: str, dwell_ms: int | None, training: TrainingSettings) -> float:
    """Implicit-feedback weight r of one event: type weight plus a capped dwell-time bonus.

    Used by batch interactions, the speed layer's SGD confidence and the fold-in, so the three agree.
    """
    base = training.weights.get(event_type, 0.0)
    if base <= 0:
        return 0.0
    bonus = 0.0
    if dwell_ms:
        bonus = min(training.dwell_bonus_cap, training.dwell_bonus_per_minute * dwell_ms / 60_000.0)
    return base + bonus


def day_index(epoch_s: float) -> int:
    """UTC day number, the bucket of the per-day popularity counts."""
    return int(epoch_s // DAY_S)


def as_matrix(rows: Sequence[np.ndarray]) -> np.ndarray:
    return np.vstack(rows) if rows else np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
