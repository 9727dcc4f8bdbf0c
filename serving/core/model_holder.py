"""The serving model: artifacts loaded once per version, with derived lookups, swapped atomically on reload.

A request reads `holder.current` once and keeps that object to the end, so a reload that
replaces it mid-request never mixes two versions and never fails the request.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.features import FEATURE_NAMES
from common.lake import Lake
from common.model import ModelArtifacts, load_model
from common.registry import Registry, RegistryError
from common.settings import CandidatePool
from common.vectors import unit_rows
from serving.core import metrics
from serving.core.catalog_view import CatalogView
from serving.core.compiled_ranker import Scorer, compile_ranker

log = logging.getLogger(__name__)

TOP_PER_LIST = 100  # co-visited and per-category lists are kept to this many items each


@dataclass
class ServingModel:
    artifacts: ModelArtifacts
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

    @cached_property  # only the similar-items route reads them: a push helper never makes this private copy
    def unit_factors(self) -> np.ndarray:
        """The item factors scaled to unit length, for similar items."""
        return unit_rows(self.artifacts.item_factors)

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
    popular = _popular(artifacts.popularity)
    by_category: dict[str, dict[str, float]] = defaultdict(dict)
    for item, count in popular:
        bucket = by_category[catalog.category(item)]
        if len(bucket) < TOP_PER_LIST:
            bucket[item] = count
    return ServingModel(
        artifacts=artifacts,
        covis=_covis(artifacts.covisitation),
        popular=popular[:1000],
        category_popular=dict(by_category),
        scorer=compile_ranker(artifacts.ranker, compiled_dir) if uses_its_ranker(artifacts) else None,
    )


def uses_its_ranker(artifacts: ModelArtifacts) -> bool:
    """Whether the version has a ranker to use, trained on this code's feature columns. One trained on others
    (a version from before a feature was added) would read misaligned columns, so serving ranks without
    it (the heuristic order of the same pool) until a version trained on these is published; so it does
    when the batch run found the ranker worse than that order (the manifest's `ranker_unused`)."""
    if artifacts.ranker is None:
        return False
    if artifacts.manifest.ranker_unused:
        log.warning("version %s serves without its ranker: %s", artifacts.version, artifacts.manifest.ranker_unused)
        return False
    trained_on = list(artifacts.ranker.feature_name())
    if trained_on == list(FEATURE_NAMES):
        return True
    log.warning(
        "version %s: its ranker was trained on other features (%d columns, this code computes %d: %s); "
        "serving ranks without it until a version trained on these is published",
        artifacts.version, len(trained_on), len(FEATURE_NAMES),
        ", ".join(sorted(set(FEATURE_NAMES) ^ set(trained_on))),
    )  # fmt: skip
    return False


def with_content_vectors(model: ServingModel, catalog: CatalogView, item_ids: Sequence[str] | None = None) -> ServingModel:
    """The model with content vectors for the catalog's items (`item_ids`, default all) that have no batch
    vector; the same object when none needs one."""
    artifacts = model.artifacts.with_content_vectors(catalog.contents(None if item_ids is None else list(item_ids)))
    if artifacts is model.artifacts:
        return model
    return replace(model, artifacts=artifacts)


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

    def __init__(
        self,
        registry: Registry,
        catalog: CatalogView,
        compiled_dir: Path | None = None,
        content_vectors: bool = True,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.compiled_dir = compiled_dir  # compiled rankers, by model hash (None: compiled in memory)
        self.content_vectors = content_vectors
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
                if self.content_vectors:
                    model = with_content_vectors(model, self.catalog)
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

    def add_content_vectors(self, item_ids: Sequence[str]) -> None:
        """New or changed catalog items: (re)compute their content vectors and swap the model in, so the next
        request scores them (one copy of the factors per call: batch the items of one update together)."""
        if not self.content_vectors or not item_ids:
            return
        with self._reload_lock:  # a reload in between would drop the vectors
            if self.current is not None:
                self.current = with_content_vectors(self.current, self.catalog, item_ids)
