"""Drift monitoring: the pool sample both sides keep, and the statistics that compare them.

A `PoolSample` is one request's ranked pool: a random subset of its feature rows (FEATURE_NAMES
columns) with the ranker's score of each, the categories of the items it served (or, for a
training request, of the top SERVED_K by score), and whether the person was cold (no batch vector
in the version: new or anonymous). Serving appends sampled requests to a capped Redis stream
(redis_keys.DRIFT_SAMPLE); training keeps a bounded sample of its requests in the version
(registry.DRIFT_BASELINE). `compare` measures the served sample against the baseline: PSI and
Kolmogorov–Smirnov per feature and for the score, the cold-start share, the category mix.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from pydantic import BaseModel, Field
from redis.typing import EncodableT, FieldT

from common import redis_keys
from common.features import FEATURE_NAMES
from common.registry import DRIFT_BASELINE, DriftCheck, Registry
from common.settings import DriftSettings

SERVED_K = 10  # a training request's "served" items: its top 10 by score, the API's default k
EPSILON = 1e-4  # floor of a bin's share in PSI, so an empty bin counts as rare instead of infinite
SCORE = "score"
CATEGORIES = "category mix"
COLD_START = "cold-start share"
PLOT_BINS = 30
RESOLUTION = 1e-3  # values closer than this share of the baseline's scale count as equal


@dataclass
class PoolSample:
    """One request's pool rows (a random subset), their scores, the served categories, cold or not."""

    at_s: float
    model_version: str
    context: str
    cold_start: bool
    categories: list[str]
    features: np.ndarray  # rows x len(FEATURE_NAMES), float32
    scores: np.ndarray  # rows, float32


def pool_sample(
    features: np.ndarray,
    scores: np.ndarray,
    rows: int,
    rng: np.random.Generator,
    *,
    at_s: float,
    model_version: str,
    context: str,
    cold_start: bool,
    categories: list[str],
) -> PoolSample:
    """At most `rows` of the pool's rows, drawn at random (a request's rows share its person, so
    keeping a few of many requests describes the traffic better than many rows of a few)."""
    keep = np.arange(len(scores))
    if len(keep) > rows:
        keep = np.sort(rng.choice(len(keep), rows, replace=False))
    return PoolSample(
        at_s=at_s,
        model_version=model_version,
        context=context,
        cold_start=cold_start,
        categories=categories,
        features=np.ascontiguousarray(features[keep], dtype=np.float32),
        scores=np.ascontiguousarray(np.asarray(scores)[keep], dtype=np.float32),
    )


# ---------------------------------------------------------------- served side: a capped Redis stream


def log_served(client: redis.Redis, sample: PoolSample, max_requests: int) -> None:
    """Append to the stream, trimmed to exactly `max_requests` entries (the oldest go)."""
    client.xadd(redis_keys.DRIFT_SAMPLE, _stream_fields(sample), maxlen=max_requests, approximate=False)


def read_served(client: redis.Redis, since_s: float | None = None, version: str | None = None) -> list[PoolSample]:
    """The sampled requests since `since_s` (by the stream's arrival time), of `version` if given.
    Entries written with another feature set (an older release) are left out."""
    start = f"{int(since_s * 1000)}-0" if since_s is not None else "-"
    out = []
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(redis_keys.DRIFT_SAMPLE, min=start))
    for _, fields in entries:
        sample = _from_stream(fields)
        if sample is not None and (version is None or sample.model_version == version):
            out.append(sample)
    return out


def _stream_fields(sample: PoolSample) -> dict[FieldT, EncodableT]:
    return {
        "at": repr(sample.at_s),
        "version": sample.model_version,
        "context": sample.context,
        "cold": "1" if sample.cold_start else "0",
        "categories": json.dumps(sample.categories),
        "columns": ",".join(FEATURE_NAMES),
        "features": sample.features.astype("<f4").tobytes(),
        "scores": sample.scores.astype("<f4").tobytes(),
    }


def _from_stream(fields: dict[bytes, bytes]) -> PoolSample | None:
    if fields.get(b"columns", b"").decode() != ",".join(FEATURE_NAMES):
        return None
    scores = np.frombuffer(fields[b"scores"], dtype="<f4")
    features = np.frombuffer(fields[b"features"], dtype="<f4").reshape(len(scores), len(FEATURE_NAMES))
    return PoolSample(
        at_s=float(fields[b"at"]),
        model_version=fields[b"version"].decode(),
        context=fields[b"context"].decode(),
        cold_start=fields[b"cold"] == b"1",
        categories=json.loads(fields[b"categories"]),
        features=features,
        scores=scores,
    )


# ---------------------------------------------------------------- training side: a version's baseline

_BASELINE_SCHEMA = pa.schema(
    [
        pa.field("at_s", pa.float64()),
        pa.field("context", pa.string()),
        pa.field("cold_start", pa.bool_()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("features", pa.list_(pa.float32())),  # rows x len(FEATURE_NAMES), row-major
        pa.field("scores", pa.list_(pa.float32())),
    ],
    metadata={"columns": ",".join(FEATURE_NAMES)},
)


def training_sample(
    features: np.ndarray,
    scores: np.ndarray,
    groups: Sequence[int],
    categories: Sequence[str],
    cold_start: Sequence[bool],
    at_s: Sequence[float],
    settings: DriftSettings,
    seed: int,
) -> list[PoolSample]:
    """The baseline of a training set (requests' rows in order, `groups` rows each): requests drawn at
    random until `baseline_rows` rows, each cut to `rows_per_request` rows as serving cuts its pools;
    categories are those of each request's top SERVED_K by score, what the ranker would have served."""
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(groups)]).astype(int)
    out: list[PoolSample] = []
    kept_rows = 0
    for r in rng.permutation(len(groups)):
        if kept_rows >= settings.baseline_rows:
            break
        lo, hi = starts[r], starts[r + 1]
        top = lo + np.argsort(-scores[lo:hi], kind="stable")[:SERVED_K]
        sample = pool_sample(
            features[lo:hi], scores[lo:hi], settings.rows_per_request, rng,
            at_s=float(at_s[r]), model_version="", context="training", cold_start=bool(cold_start[r]),
            categories=[categories[i] for i in top],
        )  # fmt: skip
        out.append(sample)
        kept_rows += len(sample.scores)
    return out


def save_baseline(registry: Registry, version: str, samples: Sequence[PoolSample]) -> None:
    """Write the version's baseline artifact (hashed into its manifest like every artifact)."""
    table = pa.table(
        {
            "at_s": [s.at_s for s in samples],
            "context": [s.context for s in samples],
            "cold_start": [s.cold_start for s in samples],
            "categories": [s.categories for s in samples],
            "features": [s.features.ravel() for s in samples],
            "scores": [s.scores for s in samples],
        },
        schema=_BASELINE_SCHEMA,
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    registry.write_bytes(registry.path(version, DRIFT_BASELINE), sink.getvalue())


def load_baseline(registry: Registry, version: str) -> list[PoolSample] | None:
    """The version's baseline, or None when it was trained before baselines were kept."""
    path = registry.path(version, DRIFT_BASELINE)
    if not registry.fs.exists(path):
        return None
    with registry.fs.open(path, "rb") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    if (table.schema.metadata or {}).get(b"columns", b"").decode() != ",".join(FEATURE_NAMES):
        return None  # written with another feature set: not comparable
    width = len(FEATURE_NAMES)
    return [
        PoolSample(
            at_s=row["at_s"],
            model_version=version,
            context=row["context"],
            cold_start=row["cold_start"],
            categories=row["categories"],
            features=np.asarray(row["features"], dtype=np.float32).reshape(-1, width),
            scores=np.asarray(row["scores"], dtype=np.float32),
        )
        for row in table.to_pylist()
    ]


# ---------------------------------------------------------------- statistics


def quantile_edges(baseline: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the baseline's quantiles; repeated edges (a value holding many rows) merge."""
    return np.unique(np.quantile(baseline, np.linspace(0, 1, bins + 1)[1:-1]))


def shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of values in each bin: (-inf, e0), [e0, e1), ..., [e_last, inf)."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, len(values))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors: sum (a - e) ln(a / e), shares floored at EPSILON."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), EPSILON)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs."""
    x, y = np.sort(x), np.sort(y)
    if len(x) == 0 or len(y) == 0:
        return 0.0
    at = np.concatenate([x, y])
    gap = np.searchsorted(x, at, side="right") / len(x) - np.searchsorted(y, at, side="right") / len(y)
    return float(np.max(np.abs(gap)))


class Distribution(BaseModel):
    """One compared quantity: its PSI and KS statistic, and the binned shares the page plots."""

    name: str
    psi: float
    ks: float | None = None
    edges: list[float] = Field(default_factory=list)  # inner edges; len(edges) + 1 bins
    baseline: list[float] = Field(default_factory=list)
    served: list[float] = Field(default_factory=list)


class DriftReport(BaseModel):
    version: str
    created_at: datetime
    since: datetime | None
    served_requests: int
    served_rows: int
    baseline_requests: int
    baseline_rows: int
    features: list[Distribution]
    score: Distribution
    score_plot: Distribution  # equal-width bins over both samples, for the histogram
    categories: Distribution  # edges empty; baseline/served are shares of `category_names`
    category_names: list[str]
    cold_start: dict[str, float]  # baseline / served share of cold requests
    psi_threshold: float
    psi_max: float  # the largest PSI over the features
    drifted: bool
    reasons: list[str]
    note: str | None = None

    def check(self) -> DriftCheck:
        return DriftCheck(
            version=self.version,
            checked_at=self.created_at,
            psi_max=self.psi_max,
            drifted=self.drifted,
            reasons=self.reasons,
            requests=self.served_requests,
        )


def compare(
    baseline: Sequence[PoolSample],
    served: Sequence[PoolSample],
    settings: DriftSettings,
    version: str,
    since: datetime | None = None,
) -> DriftReport:
    """The served sample against the baseline; drifted when a PSI or the cold-start share moves past its
    threshold and enough requests were sampled to say so."""
    base_x, base_s = _stack(baseline)
    served_x, served_s = _stack(served)
    features = [
        _distribution(name, base_x[:, j], served_x[:, j], settings.bins) for j, name in enumerate(FEATURE_NAMES)
    ]
    score = _distribution(SCORE, base_s, served_s, settings.bins)
    names, categories = _category_mix(baseline, served)
    cold = {
        "baseline": float(np.mean([s.cold_start for s in baseline])) if baseline else 0.0,
        "served": float(np.mean([s.cold_start for s in served])) if served else 0.0,
    }
    threshold = settings.psi_threshold
    reasons = [f"{d.name}: PSI {d.psi:.3f}" for d in (*features, score, categories) if d.psi > threshold]
    if abs(cold["served"] - cold["baseline"]) > settings.cold_start_threshold:
        reasons.append(f"{COLD_START}: {cold['baseline']:.1%} -> {cold['served']:.1%}")
    note = None
    if len(served) < settings.min_requests:
        note = f"{len(served)} sampled requests, fewer than drift.min_requests={settings.min_requests}: not judged"
    return DriftReport(
        version=version,
        created_at=datetime.now(UTC),
        since=since,
        served_requests=len(served),
        served_rows=len(served_s),
        baseline_requests=len(baseline),
        baseline_rows=len(base_s),
        features=features,
        score=score,
        score_plot=_plot_bins(SCORE, base_s, served_s),
        categories=categories,
        category_names=names,
        cold_start=cold,
        psi_threshold=threshold,
        psi_max=max((d.psi for d in features), default=0.0),
        drifted=bool(reasons) and note is None,
        reasons=reasons,
        note=note,
    )


def record(registry: Registry, report: DriftReport) -> bool:
    """Keep the report's outcome beside the version's manifest; returns True when this check marked it
    drifted for the first time (what triggers a retrain)."""
    if report.note is not None:
        return False
    first = report.drifted and registry.drift_marker(report.version) is None
    registry.record_drift(report.check())
    return first


def _stack(samples: Sequence[PoolSample]) -> tuple[np.ndarray, np.ndarray]:
    if not samples:
        return np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, np.float32)
    return np.vstack([s.features for s in samples]), np.concatenate([s.scores for s in samples])


def _distribution(name: str, base: np.ndarray, served: np.ndarray, bins: int) -> Distribution:
    if len(base) == 0 or len(served) == 0:
        return Distribution(name=name, psi=0.0, ks=0.0)
    low, step = _resolution(base)
    base_q, served_q = np.floor((base - low) / step), np.floor((served - low) / step)
    # A quantile value closes its own bin one grid step later, so a value holding many rows (0 of a mostly
    # zero feature) is a bin of its own; and values outside the baseline's range are bins of their own
    # (else a shift past the top quantile would stay in the open last bin).
    quantiles = quantile_edges(base_q, bins)
    edges = np.unique(np.concatenate([quantiles, quantiles + 1, [base_q.min(), base_q.max() + 1]]))
    expected, actual = shares(base_q, edges), shares(served_q, edges)
    return Distribution(
        name=name,
        psi=psi(expected, actual),
        ks=ks_statistic(base_q, served_q),
        edges=(edges * step + low).tolist(),
        baseline=expected.tolist(),
        served=actual.tolist(),
    )


def _resolution(base: np.ndarray) -> tuple[float, float]:
    """(origin, step) of the grid values are compared on: RESOLUTION of the baseline's scale (its 1-99 %
    range, or its magnitude where that is larger). A feature whose values sit on one point and creep far
    less than that (every item's age, seconds later) would else split its quantile edges on the creep
    and read as a total shift."""
    low, high = (float(v) for v in np.quantile(base, [0.01, 0.99]))
    scale = max(high - low, abs(low), abs(high)) or float(np.max(np.abs(base))) or 1.0
    return low, scale * RESOLUTION


def _plot_bins(name: str, base: np.ndarray, served: np.ndarray) -> Distribution:
    both = np.concatenate([base, served])
    if len(both) == 0:
        return Distribution(name=name, psi=0.0)
    low, high = np.quantile(both, [0.005, 0.995])
    edges = np.linspace(low, high, PLOT_BINS + 1)[1:-1] if high > low else np.array([low])
    return Distribution(
        name=name, psi=0.0, edges=edges.tolist(), baseline=shares(base, edges).tolist(),
        served=shares(served, edges).tolist(),
    )  # fmt: skip


def _category_mix(baseline: Sequence[PoolSample], served: Sequence[PoolSample]) -> tuple[list[str], Distribution]:
    base = Counter(c for s in baseline for c in s.categories)
    live = Counter(c for s in served for c in s.categories)
    names = sorted(set(base) | set(live), key=lambda c: (-(base[c] + live[c]), c))
    expected = np.array([base[c] for c in names], dtype=np.float64) / max(1, sum(base.values()))
    actual = np.array([live[c] for c in names], dtype=np.float64) / max(1, sum(live.values()))
    value = psi(expected, actual) if base and live else 0.0
    return names, Distribution(name=CATEGORIES, psi=value, baseline=expected.tolist(), served=actual.tolist())
