"""A version's recorded training parameters reach serving: fold-in constants and candidate pool sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.serve import publish_synthetic_model
from common.lake import Lake
from common.model import load_model
from common.registry import Registry
from common.settings import CandidatePool, TrainingSettings
from serving.core.model_holder import ServingModel


def _serving_model(tmp_path: Path, parameters: dict[str, object]) -> ServingModel:
    registry = Registry(str(tmp_path / "models"))
    publish_synthetic_model(registry, Lake(str(tmp_path / "lake")), n_items=30, n_users=5, factors=4)
    artifacts = load_model(registry, "v1")
    artifacts.manifest = artifacts.manifest.model_copy(update={"parameters": parameters})
    return ServingModel(artifacts=artifacts, unit_factors=np.zeros((30, 4)), covis={}, popular=[])


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
