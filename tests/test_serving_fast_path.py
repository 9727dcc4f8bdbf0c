"""The request path's fast parts give what they replace: the compiled ranker the booster's scores and lists,
the msgspec body the documented response model."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from common import redis_keys
from common.candidates import merge_sources, top_n_indices, top_scored
from common.features import FEATURE_NAMES
from common.model import load_model
from common.registry import Registry
from serving.core.compiled_ranker import booster_scorer, compile_ranker
from serving.core.recommender import Recommended, RecRequest, recommend
from serving.schemas import RecommendationsResponse, RecommendedItem
from tests.test_serving_support import seed_session_view, serving_state

pytest_plugins = ["tests.test_serving_support"]


def feature_rows(booster: object, n: int = 400, seed: int = 5) -> np.ndarray:
    """Random rows, and rows sitting exactly on each split threshold (where float32 vs float64 could differ)."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (n, len(FEATURE_NAMES))).astype(np.float32)
    thresholds: list[tuple[int, float]] = []

    def walk(node: dict) -> None:
        if "split_feature" in node:
            thresholds.append((node["split_feature"], node["threshold"]))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in booster.dump_model()["tree_info"]:  # type: ignore[attr-defined]
        walk(tree["tree_structure"])
    on_split = np.repeat(rows[:1], len(thresholds), axis=0)
    for row, (feature, threshold) in enumerate(thresholds):
        on_split[row, feature] = np.float32(threshold)
    return np.vstack([rows, on_split])


def test_compiled_ranker_scores_equal_the_boosters_and_are_cached(
    published: SyntheticModel, recs_env: Path, tmp_path: Path
) -> None:
    booster = load_model(Registry(str(recs_env / "models"))).ranker
    rows = feature_rows(booster)
    cache = tmp_path / "compiled"
    compiled = compile_ranker(booster, cache)
    expected = booster.predict(rows, num_threads=1)
    assert np.max(np.abs(compiled(rows) - expected)) <= 1e-6
    assert len(list(cache.glob("*.o"))) == 1, "compiled to native code, kept under the model's hash"
    again = compile_ranker(booster, cache)  # another worker: loads the object file
    assert np.array_equal(again(rows), compiled(rows))


def test_without_lleaves_the_booster_scores(published: SyntheticModel, recs_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    booster = load_model(Registry(str(recs_env / "models"))).ranker
    monkeypatch.setitem(sys.modules, "lleaves", None)  # as if not installed: importing it fails
    rows = feature_rows(booster)
    assert np.array_equal(compile_ranker(booster, None)(rows), booster.predict(rows, num_threads=1))


def test_compiled_ranker_serves_the_boosters_lists(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    state = serving_state(client)
    model = state.models.current
    assert model is not None and model.artifacts.ranker is not None
    for n in range(12):
        seed_session_view(redis_client, f"anon-{n}", "s1", f"i{n}", f"cat{n % 8}", {f"i{n + 16}": 5.0})
    people = [RecRequest(f"u{n}", None, None, 20, "home") for n in range(20)]
    people += [RecRequest(None, f"anon-{n}", "s1", 20, "product" if n % 2 else "home", f"i{n + 8}") for n in range(12)]
    now_s = time.time()
    compiled = [recommend(state, req, now_s=now_s) for req in people]
    model.scorer = booster_scorer(model.artifacts.ranker)
    booster = [recommend(state, req, now_s=now_s) for req in people]
    assert {r.variant for r in compiled} >= {"ranker"}
    for mine, theirs in zip(compiled, booster, strict=True):
        assert [i.item_id for i in mine.items] == [i.item_id for i in theirs.items]
        assert [i.score for i in mine.items] == pytest.approx([i.score for i in theirs.items], abs=1e-6)


def test_recommendations_body_is_the_documented_model(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    # The recommender's dataclass is encoded as the schema's item: the same fields, in the same order.
    assert [f.name for f in dataclasses.fields(Recommended)] == list(RecommendedItem.model_fields)
    spec = client.app.openapi()  # type: ignore[attr-defined]
    schema = {"$ref": "#/components/schemas/RecommendationsResponse", "components": spec["components"]}
    seed_session_view(redis_client, "anon-body", "s1", "i3", "cat3", {"i11": 4.0})
    redis_client.sadd(redis_keys.PROMOTED, "i11")
    for params in (
        {"user_id": "u1", "k": 15},
        {"anonymous_id": "anon-body", "session_id": "s1"},
        {"user_id": "u2", "context": "product", "item_id": "i4"},
        {"anonymous_id": "nobody-known"},
    ):
        response = client.get("/v1/recommendations", params=params)
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        jsonschema.Draft202012Validator(schema).validate(body)
        assert RecommendationsResponse.model_validate_json(response.content).model_dump(mode="json") == body
        assert body["items"] and all(isinstance(i["promoted"], bool) for i in body["items"])


def test_top_n_is_what_a_full_partition_picks() -> None:
    rng = np.random.default_rng(1)
    for trial in range(200):
        total = int(rng.integers(10, 80_000))
        n = int(rng.integers(1, min(total, 120) + 1))
        scores = rng.normal(0, 1, total).astype(np.float32)
        if trial % 4 == 1:
            scores.sort()  # ordered items: a strided sample would see only one end
        elif trial % 4 == 2:
            scores = np.zeros(total, np.float32)  # a few high scores the sample most likely misses
            scores[rng.choice(total, min(total, 5), replace=False)] = 5 + rng.random(min(total, 5))
            scores += rng.normal(0, 1e-3, total).astype(np.float32)
        full = np.argpartition(scores, total - n)[total - n :]
        assert np.array_equal(top_n_indices(scores, n), full[np.argsort(-scores[full], kind="stable")])


def test_top_scored_is_the_full_sort_with_ties_by_id() -> None:
    rng = np.random.default_rng(2)
    for trial in range(300):
        total = int(rng.integers(0, 400))
        n = int(rng.integers(0, 60))
        # Few distinct values on some trials: many ties, also at the n-th place.
        values = rng.integers(0, 4, total) if trial % 2 else rng.normal(0, 1, total)
        scores = {f"i{int(j)}": float(v) for j, v in zip(rng.permutation(total), values, strict=True)}
        assert top_scored(scores, n) == sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def test_merge_sources_keeps_first_seen_order_and_every_source() -> None:
    lists = {"als": [("a", 1.0), ("b", 0.5)], "covis": [("b", 3.0), ("c", 1.0)], "trending": [("a", 9.0)]}
    merged = merge_sources(lists)
    assert list(merged) == ["a", "b", "c"]
    assert merged == {"a": {"als", "trending"}, "b": {"als", "covis"}, "c": {"covis"}}


def test_similar_items_equal_the_blend_over_every_items_cosine() -> None:
    """The sampled top-n (serving/core/similar.py) gives what scoring and blending every item gives: over
    20k items, past the size where the sample bounds the partition, with co-visits and exclusions."""
    from datetime import UTC, datetime

    from common.model import ModelArtifacts
    from common.registry import Manifest
    from serving.core.model_holder import ServingModel
    from serving.core.similar import similar_items

    rng = np.random.default_rng(3)
    n_items, k = 20_000, 10
    factors = rng.normal(0, 1, (n_items, 16)).astype(np.float32)
    ids = [f"i{j}" for j in range(n_items)]
    now = datetime.now(UTC)
    manifest = Manifest(version="v", created_at=now, cutoff=now, engine="test", parameters={}, metrics={})
    artifacts = ModelArtifacts("v", manifest, ids, factors, [], np.zeros((0, 16), np.float32), np.eye(16))
    model = ServingModel(artifacts=artifacts, covis={}, popular=[])

    def excluded(item: str) -> bool:
        return item.endswith("7")  # a tenth of the catalog out of stock

    for anchor in range(0, n_items, 997):
        covisits = {ids[(anchor + step) % n_items]: float(step) for step in (1, 5, 9)}
        cosines = model.unit_factors @ model.unit_factors[anchor]
        shares = {other: count / 9.0 for other, count in covisits.items()}
        blended = sorted(
            (max(float(cosines[j]), 0.0) + shares.get(ids[j], 0.0), ids[j])
            for j in range(n_items)
            if j != anchor and not excluded(ids[j])
        )
        expected = [(item, score) for score, item in sorted(blended, key=lambda sv: (-sv[0], sv[1]))[:k]]
        found = similar_items(model, ids[anchor], covisits, excluded, k)
        assert found is not None
        assert [(s.item_id, s.score) for s in found] == expected, anchor
