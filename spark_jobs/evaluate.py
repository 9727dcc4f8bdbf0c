"""Offline evaluation on a held-out window, at 20 items: popularity, ALS alone, the candidate pool
scored without the ranker (`heuristic`, serving's als_only) and with it (`als_ranker`).

Each request is a moment before a session's next new item (spark_jobs/replay.py), the one relevant
item, as `recs evaluate replay` scores; the pool comes from the gatherer serving uses. Metrics are
averaged over requests; coverage is the share of the catalog that any list recommended. Per-request
reciprocal ranks are kept so the gate can compare two strategies request by request.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.candidates import als_top_n
from common.features import FEATURE_NAMES, compute_features
from common.gatherer import heuristic_scores, rank_scores
from spark_jobs.replay import PointInTime, Request

K = 20
STRATEGIES = ("popular", "als", "heuristic", "als_ranker")


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


def ranked_lists(pit: PointInTime, requests: list[Request], ranker: Any | None) -> dict[str, list[list[str]]]:
    """strategy -> the top-K list served at each request's moment (padded with popular items)."""
    lists: dict[str, list[list[str]]] = {s: [] for s in STRATEGIES}
    pool: list[list[str]] = []
    blocks: list[np.ndarray] = []
    for request in requests:
        state = pit.state(request)
        als = []
        if state.user_vector is not None:
            als = [i for i, _ in als_top_n(state.user_vector, pit.model.scan_blocks, pit.model.item_ids, K)]
        lists["popular"].append(pit.popular[:K])
        lists["als"].append(_pad(als, pit.popular))
        gathered, cands = pit.gather(request, state)
        ranks = {source: rank_scores(pairs) for source, pairs in gathered.lists.items()}
        heuristic = heuristic_scores(pit.model, ranks, cands.item_ids, state.user_vector)
        lists["heuristic"].append(_pad(_top(cands.item_ids, heuristic), pit.popular))
        pool.append(cands.item_ids)
        blocks.append(compute_features(state, cands))
    # One predict call for all requests: LightGBM's per-call start-up dwarfs a single request's work.
    features = np.vstack(blocks) if blocks else np.zeros((0, len(FEATURE_NAMES)), np.float32)
    scores = ranker.predict(features) if ranker is not None and len(features) else np.zeros(len(features))
    offset = 0
    for items in pool:
        lists["als_ranker"].append(_pad(_top(items, scores[offset : offset + len(items)]), pit.popular))
        offset += len(items)
    return lists


def evaluate(pit: PointInTime, requests: list[Request], ranker: Any | None) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """(strategy -> {recall_at_20 (= HR@20: one target), mrr_at_20, ndcg_at_20, coverage, requests}, strategy -> per-request reciprocal rank)."""
    lists = ranked_lists(pit, requests, ranker)
    relevant = [{r.target} for r in requests]
    catalog = max(len(pit.log.item_ids), 1)
    reciprocal = {
        strategy: [mrr_at_k(ranked, rel) for ranked, rel in zip(lists[strategy], relevant, strict=True)]
        for strategy in STRATEGIES
    }
    metrics = {
        strategy: {
            "recall_at_20": _mean([recall_at_k(ranked, rel) for ranked, rel in zip(lists[strategy], relevant, strict=True)]),
            "mrr_at_20": _mean(reciprocal[strategy]),
            "ndcg_at_20": _mean([ndcg_at_k(ranked, rel) for ranked, rel in zip(lists[strategy], relevant, strict=True)]),
            "coverage": len({i for ranked in lists[strategy] for i in ranked[:K]}) / catalog,
            "requests": float(len(requests)),
        }
        for strategy in STRATEGIES
    }
    return metrics, reciprocal


def _top(items: list[str], scores: np.ndarray) -> list[str]:
    order = np.argsort(-np.asarray(scores), kind="stable")[:K]
    return [items[i] for i in order]


def _pad(ranked: list[str], popular: list[str]) -> list[str]:
    seen = set(ranked)
    return ranked + [i for i in popular if i not in seen][: max(0, K - len(ranked))]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def holdout_recall(
    user_ids: Sequence[str],
    user_factors: np.ndarray,
    item_ids: Sequence[str],
    item_factors: np.ndarray,
    seen: dict[str, set[str]],
    future: dict[str, set[str]],
    k: int = K,
) -> float:
    """ALS alone, per known person: of the new items they engaged with later, the share in their top k
    (seen items excluded; at most k can be found). Engine-neutral: it reads only factors."""
    index = {item: i for i, item in enumerate(item_ids)}
    users = {u: i for i, u in enumerate(user_ids)}
    recalls = []
    for person, wanted in future.items():
        row = users.get(person)
        relevant = {i for i in wanted if i in index} - seen.get(person, set())
        if row is None or not relevant:
            continue
        scores = item_factors @ user_factors[row]
        for item in seen.get(person, ()):
            if item in index:
                scores[index[item]] = -np.inf
        top = np.argpartition(-scores, k)[:k] if len(scores) > k else np.arange(len(scores))
        hits = sum(1 for i in top if item_ids[i] in relevant)
        recalls.append(hits / min(len(relevant), k))
    return _mean(recalls)
