"""The gate on a real nightly run (no Airflow): a version whose ranker makes its own candidate pool
worse is refused, with the paired comparison in its manifest; the same run with its real ranker passes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.features import FEATURE_NAMES
from common.lake import Lake
from common.model import save_ranker
from common.registry import Registry
from common.settings import Settings, TrainingSettings, load_settings
from spark_jobs import pipeline
from spark_jobs.plan import DEV_MODEL, make_plan

CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recs.generate import generate

    root = tmp_path_factory.mktemp("gate-shop") / "lake"
    generate("tiny", 5, Lake(str(root)), end_date=CUTOFF.date())
    return root


def settings_for(shop: Path, work: Path) -> Settings:
    base = load_settings(training=TrainingSettings(factors=16, iterations=8, max_requests=1500))
    return base.model_copy(
        update={
            "var_dir": work,
            "lake": base.lake.model_copy(update={"root": str(shop)}),
            "models": base.models.model_copy(update={"root": str(work / "models")}),
        }
    )


def contrary_ranker() -> Any:
    """A booster that ranks against the session's signals: the fewer co-visits and the lower the ALS
    score, the higher."""
    import lightgbm

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, (3000, len(FEATURE_NAMES))).astype(np.float32)  # the features' usual range
    signals = [i for i, name in enumerate(FEATURE_NAMES) if name in ("covis", "covis_last", "als_score", "neighbours")]
    y = (x[:, signals].sum(axis=1) < 3).astype(int)
    train = lightgbm.Dataset(x, y, group=[30] * 100, feature_name=list(FEATURE_NAMES))
    return lightgbm.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1}, train, num_boost_round=20)


def run(settings: Settings, sabotage: bool) -> dict[str, Any]:
    plan = make_plan(settings, CUTOFF, "implicit")
    pipeline.validate(settings, plan.cutoff)
    for step in (pipeline.build_interactions, pipeline.train_als, pipeline.train_ranker):
        step(plan, settings)
    if sabotage:  # the evaluate step scores the dev ranker
        save_ranker(Registry(str(plan.dev_registry)), DEV_MODEL, contrary_ranker())
    pipeline.evaluate(plan, settings)
    return pipeline.gate_and_publish(plan, settings)


def test_a_ranker_worse_than_its_own_pool_is_refused(shop: Path, tmp_path: Path) -> None:
    settings = settings_for(shop, tmp_path)
    gate = run(settings, sabotage=True)
    registry = Registry(settings.models.root)
    manifest = registry.read_manifest(gate["version"])
    assert gate["published"] is False and manifest.status == "rejected" and registry.current() is None
    assert "the ranker makes lists worse than its candidates" in (manifest.decision or "")
    paired = manifest.metrics["paired_vs_heuristic"]
    assert paired["high"] < 0 and manifest.metrics["als_ranker"]["mrr_at_20"] < manifest.metrics["heuristic"]["mrr_at_20"]


def test_the_same_run_with_its_trained_ranker_is_published(shop: Path, tmp_path: Path) -> None:
    settings = settings_for(shop, tmp_path)
    gate = run(settings, sabotage=False)
    manifest = Registry(settings.models.root).read_manifest(gate["version"])
    assert gate["published"] is True, manifest.decision
    assert manifest.metrics["paired_vs_heuristic"]["low"] > 0  # the ranker adds to its pool beyond noise
