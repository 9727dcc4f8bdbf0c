"""Offline evaluation on a held-out window: popularity, ALS alone and ALS + ranker, at 20 items.

Each request's relevant set is what the person acted on in the rest of the session; metrics
are averaged over requests, coverage is the share of the catalog that any list recommended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.candidates import als_top_n
from common.features import compute_features
from spark_jobs.replay import PointInTime, Request

K = 20
STRATEGIES = ("popular", "als", "als_ranker")


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    dcg = sum(1.0 / math.log2(rank + 2) for rank, item in enumerate(ranked[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: set[str], k: int = K) -> float:
    for rank, item in enumerate(ranked[:k]):
        if item in relevant:
            return 1.0 / (rank + 1)
    return 0.0


def recommend(pit: PointInTime, request: Request, strategy: str, ranker: Any | None) -> list[str]:
    """The top-K list a strategy serves at the request's moment (padded with popular items)."""
    if strategy == "popular":
        return pit.popular[:K]
    state = pit.state(request)
    ranked: list[str] = []
    if strategy == "als" and state.user_vector is not None:
        ranked = [i for i, _ in als_top_n(state.user_vector, pit.model.item_factors, pit.model.item_ids, K)]
    elif strategy == "als_ranker":
        cands = pit.candidates(state)
        if len(cands):
            scores = ranker.predict(compute_features(state, cands)) if ranker is not None else np.zeros(len(cands))
            order = np.argsort(-scores, kind="stable")[:K]
            ranked = [cands.item_ids[i] for i in order]
    return _pad(ranked, pit.popular)


def evaluate(pit: PointInTime, requests: list[Request], ranker: Any | None) -> dict[str, dict[str, float]]:
    """strategy -> {recall_at_20, ndcg_at_20, mrr_at_20, coverage, requests}."""
    metrics: dict[str, dict[str, float]] = {}
    catalog = max(len(pit.log.item_ids), 1)
    for strategy in STRATEGIES:
        recall, ndcg, mrr, shown = [], [], [], set()
        for request in requests:
            relevant = set(request.labels)
            ranked = recommend(pit, request, strategy, ranker)
            recall.append(recall_at_k(ranked, relevant))
            ndcg.append(ndcg_at_k(ranked, relevant))
            mrr.append(mrr_at_k(ranked, relevant))
            shown.update(ranked[:K])
        metrics[strategy] = {
            "recall_at_20": _mean(recall),
            "ndcg_at_20": _mean(ndcg),
            "mrr_at_20": _mean(mrr),
            "coverage": len(shown) / catalog,
            "requests": float(len(requests)),
        }
    return metrics


def _pad(ranked: list[str], popular: list[str]) -> list[str]:
    seen = set(ranked)
    return ranked + [i for i in popular if i not in seen][: max(0, K - len(ranked))]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
