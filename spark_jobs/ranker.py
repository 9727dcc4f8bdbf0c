"""LightGBM LambdaRank on point-in-time feature rows, grouped by request, early-stopped on a later window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.features import FEATURE_NAMES, compute_features
from spark_jobs.replay import PointInTime, Request

PARAMS: dict[str, Any] = {
    "objective": "lambdarank",
    "metric": "ndcg",
    "eval_at": [20],
    "learning_rate": 0.1,
    "num_leaves": 31,
    "min_data_in_leaf": 20,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambdarank_truncation_level": 20,
    "verbose": -1,
    "num_threads": 2,
}
MAX_ROUNDS = 200
EARLY_STOPPING = 20


@dataclass
class Rows:
    features: np.ndarray  # rows x len(FEATURE_NAMES)
    labels: np.ndarray  # int relevance (spark_jobs.replay: NEXT_ITEM, NEXT_ITEM_BOUGHT, else 0)
    groups: list[int]  # rows per request, in order
    # What the drift baseline (common/drift.py) keeps beside the features:
    categories: list[str] = field(default_factory=list)  # per row: the candidate's category
    cold_start: list[bool] = field(default_factory=list)  # per request: no batch vector of the person
    at_s: list[float] = field(default_factory=list)  # per request: its moment

    @property
    def requests(self) -> int:
        return len(self.groups)


def feature_rows(pit: PointInTime, requests: list[Request]) -> Rows:
    """Candidates and features of each request (in log order); requests whose pool misses every
    labelled item teach nothing and are left out."""
    blocks, labels, groups = [], [], []
    categories: list[str] = []
    cold_start: list[bool] = []
    at_s: list[float] = []
    for request in requests:
        state = pit.state(request)
        _, cands = pit.gather(request, state)
        y = np.asarray([request.labels.get(i, 0) for i in cands.item_ids], dtype=np.int32)
        if len(y) < 2 or y.max() == 0:
            continue
        blocks.append(compute_features(state, cands))
        labels.append(y)
        groups.append(len(y))
        categories.extend(cands.categories)
        cold_start.append(pit.model.user_vector(request.person) is None)  # as serving counts it
        at_s.append(request.now_s)
    if not blocks:
        return Rows(np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.int32), [])
    return Rows(np.vstack(blocks), np.concatenate(labels), groups, categories, cold_start, at_s)


def train_ranker(train: Rows, valid: Rows, seed: int) -> Any:
    """Fit the booster; stops when NDCG@20 on the validation window stops improving."""
    import lightgbm as lgb

    if train.requests == 0:
        raise ValueError("no ranker training requests: the window before validation holds no usable sessions")
    params = {**PARAMS, "seed": seed, "deterministic": True}
    train_set = lgb.Dataset(train.features, train.labels, group=train.groups, feature_name=list(FEATURE_NAMES))
    callbacks: list[Callable[..., Any]] = [lgb.log_evaluation(0)]
    valid_sets = []
    if valid.requests:
        valid_sets = [lgb.Dataset(valid.features, valid.labels, group=valid.groups, reference=train_set)]
        callbacks.append(lgb.early_stopping(EARLY_STOPPING, verbose=False))
    return lgb.train(params, train_set, num_boost_round=MAX_ROUNDS, valid_sets=valid_sets, callbacks=callbacks)
