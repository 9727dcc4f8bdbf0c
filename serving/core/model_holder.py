"""The serving model: artifacts loaded once per version, with derived lookups, swapped atomically on reload.

A request reads `holder.current` once and keeps that object to the end, so a reload that
replaces it mid-request never mixes two versions and never fails the request.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.lake import Lake
from common.model import ModelArtifacts, load_model
from common.registry import Registry, RegistryError
from common.settings import CandidatePool
from serving.core import metrics
from serving.core.catalog_view import CatalogView
from serving.core.compiled_ranker import Scorer, compile_ranker

log = logging.getLogger(__name__)

TOP_PER_LIST = 100  # co-visited and per-category lists are kept to this many items each


@dataclass
class ServingModel:
    artifacts: ModelArtifacts
    unit_factors: np.ndarray  # item factors scaled to unit length, for similar items
    covis: dict[str, dict[str, float]]  # batch co-visitation: item -> other -> count
    popular: list[tuple[str, float]]  # batch popularity, best first
    category_popular: dict[str, dict[str, float]] = field(default_factory=dict)
    scorer: Scorer | None = None  # the ranker's scores (compiled when possible); None without a ranker

    @property
    def version(self) -> str:
        return self.artifacts.version

    @property
    def alpha(self) -> float:
        return float(self._parameter("alpha", 10.0))

    @property
    def regularization(self) -> float:
        return float(self._parameter("regularization", 0.05))

    @cached_property  # read on every request: validated once per loaded version
    def candidate_pool(self) -> CandidatePool:
        """The pool sizes the version's ranker was trained on (the defaults for a version that recorded none)."""
        return CandidatePool.model_validate(self._parameter("candidates", {}))

    def _parameter(self, name: str, default: Any) -> Any:
        """A training parameter from the manifest (the pipeline nests them under "training")."""
        parameters = self.artifacts.manifest.parameters
        return parameters.get("training", {}).get(name, parameters.get(name, default))


def build_serving_model(
    artifacts: ModelArtifacts, catalog: CatalogView, compiled_dir: Path | None = None
) -> ServingModel:
    factors = np.ascontiguousarray(artifacts.item_factors, dtype=np.float32)
    artifacts.item_factors = factors
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    unit = factors / np.maximum(norms, 1e-12)
    popular = _popular(artifacts.popularity)
    by_category: dict[str, dict[str, float]] = defaultdict(dict)
    for item, count in popular:
        bucket = by_category[catalog.category(item)]
        if len(bucket) < TOP_PER_LIST:
            bucket[item] = count
    return ServingModel(
        artifacts=artifacts,
        unit_factors=unit.astype(np.float32),
        covis=_covis(artifacts.covisitation),
        popular=popular[:1000],
        category_popular=dict(by_category),
        scorer=compile_ranker(artifacts.ranker, compiled_dir) if artifacts.ranker is not None else None,
    )


def _popular(table: pa.Table | None) -> list[tuple[str, float]]:
    if table is None or table.num_rows == 0:
        return []
    table = table.sort_by([("count", "descending"), ("item_id", "ascending")])
    return list(zip(table["item_id"].to_pylist(), map(float, table["count"].to_pylist()), strict=True))


def _covis(table: pa.Table | None) -> dict[str, dict[str, float]]:
    if table is None or table.num_rows == 0:
        return {}
    table = table.sort_by([("item_id", "ascending"), ("count", "descending")])
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for item, other, count in zip(
        table["item_id"].to_pylist(), table["other_id"].to_pylist(), table["count"].to_pylist(), strict=True
    ):
        row = out[item]
        if len(row) < TOP_PER_LIST:
            row[other] = float(count)
    return dict(out)


def lake_popular(lake: Lake, days: int = 7, n: int = 1000) -> list[tuple[str, float]]:
    """Most frequent items in the lake's recent events: the answer when no model exists yet."""
    start = datetime.now(UTC) - timedelta(days=days)
    try:
        events = lake.read_events(start=start, columns=["item_id"])
    except Exception:  # an unreadable lake leaves the catalog as the last fallback
        log.exception("could not read recent events from the lake")
        return []
    items = events["item_id"].drop_null()
    if len(items) == 0:
        return []
    counts = pc.value_counts(items)
    pairs = [(c["values"].as_py(), float(c["counts"].as_py())) for c in counts]
    return sorted(pairs, key=lambda kv: (-kv[1], kv[0]))[:n]


class ModelHolder:
    """Holds the serving model; reloads are serialised, swaps are one reference assignment."""

    def __init__(self, registry: Registry, catalog: CatalogView, compiled_dir: Path | None = None) -> None:
        self.registry = registry
        self.catalog = catalog
        self.compiled_dir = compiled_dir  # compiled rankers, by model hash (None: compiled in memory)
        self.current: ServingModel | None = None
        self.last_error: str | None = None
        self._reload_lock = threading.Lock()

    def reload(self, version: str | None = None) -> ServingModel | None:
        """Load `version` (default: the registry's CURRENT) and swap it in; keep the old one on failure."""
        with self._reload_lock:
            target = version or self.registry.current()
            if target is None:
                self.last_error = "no model version is active in the registry"
                return self.current
            if self.current is not None and self.current.version == target:
                return self.current
            try:
                artifacts = load_model(self.registry, target)
                model = build_serving_model(artifacts, self.catalog, self.compiled_dir)
            except (RegistryError, OSError, ValueError) as exc:
                self.last_error = f"could not load model {target}: {exc}"
                metrics.MODEL_LOADS.labels(outcome="failed").inc()
                log.error(self.last_error)
                return self.current
            previous = self.current.version if self.current else None
            self.current = model
            self.last_error = None
            metrics.MODEL_LOADS.labels(outcome="loaded").inc()
            metrics.set_model_version(model.version, previous)
            metrics.set_model_age(artifacts.manifest.cutoff)
            log.info("serving model %s (was %s)", model.version, previous)
            return model
