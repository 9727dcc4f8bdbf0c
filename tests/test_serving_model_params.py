"""A version's recorded training parameters reach serving: fold-in constants and candidate pool sizes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from bench.serve import publish_synthetic_model
from common.features import FEATURE_NAMES
from common.lake import Lake
from common.model import load_model, save_ranker
from common.registry import Registry
from common.settings import CandidatePool, TrainingSettings
from serving.core.catalog_view import CatalogView
from serving.core.model_holder import ServingModel, build_serving_model


def _serving_model(tmp_path: Path, parameters: dict[str, object]) -> ServingModel:
    registry = Registry(str(tmp_path / "models"))
    publish_synthetic_model(registry, Lake(str(tmp_path / "lake")), n_items=30, n_users=5, factors=4)
    artifacts = load_model(registry, "v1")
    artifacts.manifest = artifacts.manifest.model_copy(update={"parameters": parameters})
    return ServingModel(artifacts=artifacts, covis={}, popular=[])


def test_a_trained_version_serves_with_its_own_constants_and_pool(tmp_path: Path) -> None:
    training = TrainingSettings(alpha=3.0, regularization=0.2, candidates=CandidatePool(als=7, covis=5))
    model = _serving_model(tmp_path, {"training": training.model_dump()})  # as the pipeline records it
    assert (model.alpha, model.regularization) == (3.0, 0.2)
    assert model.candidate_pool == CandidatePool(als=7, covis=5)
    assert model.candidate_pool.als != CandidatePool().als  # the recorded size, not the default


def test_a_version_without_a_recorded_pool_uses_the_default_pool(tmp_path: Path) -> None:
    model = _serving_model(tmp_path, {"alpha": 12.0})
    assert model.alpha == 12.0 and model.regularization == 0.05
    assert model.candidate_pool == CandidatePool()


def test_a_ranker_trained_on_other_feature_columns_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A version trained before a feature column was added would read misaligned columns: serving ranks
    its pools without it (the heuristic order) and says why; a ranker trained on today's columns is used."""
    import lightgbm

    registry, lake = Registry(str(tmp_path / "models")), Lake(str(tmp_path / "lake"))
    publish_synthetic_model(registry, lake, n_items=30, n_users=5, factors=4)
    catalog = CatalogView.from_lake(lake)
    assert build_serving_model(load_model(registry, "v1"), catalog).scorer is not None

    older = [name for name in FEATURE_NAMES if name != "seeds_cosine"]
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (300, len(older)))
    data = lightgbm.Dataset(x, (x[:, 0] > 0).astype(int), group=[30] * 10, feature_name=older)
    save_ranker(registry, "v1", lightgbm.train({"objective": "lambdarank", "verbose": -1}, data, num_boost_round=3))
    with caplog.at_level(logging.WARNING, logger="serving.core.model_holder"):
        model = build_serving_model(load_model(registry, "v1"), catalog)
    assert model.scorer is None and model.artifacts.ranker is not None
    assert "v1: its ranker was trained on other features" in caplog.text and "seeds_cosine" in caplog.text
