"""Content vectors: an item's text and attributes mapped into the ALS item-factor space, so an item with no
batch vector (new since the cutoff) can be scored, folded in and compared before any retrain.

Features are hashed word, word-pair and character n-grams of the title, the category path, the brand
and a price band, in a fixed dimension (a new item needs no vocabulary). The map is a ridge regression
fitted nightly on the items that have both content and a batch vector (`fit_content_map`). Batch,
speed layer, serving and the replay all featurise through `content_features`.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse as sp

DIMENSION = 1 << 15  # hashed feature buckets (the map is DIMENSION x factors float32: 8 MB at 64 factors)
DAMPING = 2.0  # ridge strength sqrt(lambda): chosen on held-out items (README "Content vectors")
HOLDOUT_SHARE = 0.1
NORM_QUANTILES = 101  # points of the norm map (ContentMap)
# Each group of features is scaled to this norm, so a long title does not outweigh the category.
GROUP_WEIGHTS = {"word": 1.0, "pair": 0.5, "char": 0.5, "category": 1.0, "brand": 0.5, "price": 0.3}
_WORD = re.compile(r"[^\W\d_]+")  # letters only: sizes and numbering say little about an item


@dataclass(frozen=True)
class ItemContent:
    """What the catalog says of an item, as far as its content vector goes."""

    title: str = ""
    category_path: tuple[str, ...] = ()
    brand: str = ""
    price: float = 0.0

    @property
    def has_text(self) -> bool:
        """Price alone says too little: an item needs a title, category or brand for a content vector."""
        return bool(self.title.strip() or self.category_path or self.brand.strip())


def content_of_row(row: Mapping[str, Any]) -> ItemContent:
    """A catalog record (common/catalog.py's Item as a dict, or a row of a catalog snapshot)."""
    path = row.get("category_path") or ([row["category"]] if row.get("category") else [])
    return ItemContent(
        title=row.get("title") or "",
        category_path=tuple(path),
        brand=row.get("brand") or "",
        price=float(row.get("price") or 0.0),
    )


def content_features(content: ItemContent) -> dict[int, float]:
    """bucket -> weight: the hashed features of one item (the one featurisation every layer uses)."""
    words = _WORD.findall(content.title.lower())
    groups: dict[str, list[str]] = {
        "word": words,
        "pair": [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)],
        "char": [f"#{g}" for w in words for g in _char_grams(w)],
        "category": [f"c{depth}:{name.lower()}" for depth, name in enumerate(content.category_path)],
        "brand": [f"b:{content.brand.strip().lower()}"] if content.brand.strip() else [],
        "price": [f"p:{int(math.log2(content.price + 1.0))}"] if content.price > 0 else [],
    }
    out: dict[int, float] = {}
    for name, tokens in groups.items():
        if not tokens:
            continue
        counts: dict[int, float] = {}
        for token in tokens:
            bucket = zlib.crc32(f"{name}|{token}".encode()) % DIMENSION
            counts[bucket] = counts.get(bucket, 0.0) + 1.0
        scale = GROUP_WEIGHTS[name] / math.sqrt(sum(v * v for v in counts.values()))
        for bucket, value in counts.items():
            out[bucket] = out.get(bucket, 0.0) + value * scale
    return out


def feature_matrix(contents: Iterable[ItemContent]) -> sp.csr_matrix:
    """One row of `content_features` per item."""
    indptr, indices, values = [0], list[int](), list[float]()
    for content in contents:
        features = content_features(content)
        indices.extend(features)
        values.extend(features.values())
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.asarray(values, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
        shape=(len(indptr) - 1, DIMENSION),
    )


@dataclass(frozen=True)
class ContentMap:
    """vector = mean + features @ weights, rescaled to a batch item's norm: the ALS item vector a content predicts.

    Ridge shrinks predictions toward the mean, so unscaled a new item's vector is shorter than nearly
    every batch vector and never reaches an ALS top n (norm carries popularity in implicit ALS). The
    norm of a prediction is mapped quantile to quantile onto the batch vectors' norms: a new item ranks
    among batch items by length as its prediction ranks among predictions for items the map never saw.
    """

    weights: np.ndarray  # float32, DIMENSION x factors
    mean: np.ndarray  # float32, factors: the mean item vector (what an item of unseen words gets)
    predicted_norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # NORM_QUANTILES
    batch_norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # at the same quantiles

    def vectors(self, contents: Sequence[ItemContent]) -> np.ndarray:
        if not contents:
            return np.zeros((0, len(self.mean)), dtype=np.float32)
        raw = feature_matrix(contents) @ self.weights + self.mean
        if len(self.predicted_norms) == 0:  # a map saved before norms were kept
            return raw.astype(np.float32)
        norms = np.linalg.norm(raw, axis=1)
        target = np.interp(norms, self.predicted_norms, self.batch_norms)
        return (raw * (target / np.maximum(norms, 1e-12))[:, None]).astype(np.float32)


def fit_content_map(
    contents: Sequence[ItemContent], factors: np.ndarray, seed: int = 0, damping: float = DAMPING
) -> tuple[ContentMap, dict[str, float]]:
    """The map from the items' contents to their factors (rows of `factors`), and its held-out figures.

    A first fit on 90 % of the items predicts the rest: their mean cosine to the true vectors against
    the mean vector's (the map earns its place only if it beats the mean), and the norms its predictions
    have for unseen items, which the final map (fitted on all items) rescales to the batch norms."""
    test = np.random.default_rng(seed).random(len(contents)) < HOLDOUT_SHARE
    train_rows, test_rows = np.flatnonzero(~test).tolist(), np.flatnonzero(test).tolist()
    weights, mean = _fit(contents, factors, damping)
    batch_norms = _quantiles(np.linalg.norm(factors.astype(np.float64), axis=1))
    if not train_rows or not test_rows:
        return ContentMap(weights, mean), {"holdout_items": 0}
    held_out = ContentMap(*_fit([contents[i] for i in train_rows], factors[train_rows], damping))
    test_contents = [contents[i] for i in test_rows]
    raw = held_out.vectors(test_contents).astype(np.float64)
    predicted_norms = _quantiles(np.linalg.norm(raw, axis=1))
    truth = factors[test_rows].astype(np.float64)
    true_norms = np.linalg.norm(truth, axis=1)
    scaled = replace(held_out, predicted_norms=predicted_norms, batch_norms=batch_norms).vectors(test_contents)
    figures = {
        "holdout_items": len(test_rows),
        "holdout_cosine": round(float(_cosines(raw, truth).mean()), 4),
        "mean_vector_cosine": round(float(_cosines(np.broadcast_to(held_out.mean, truth.shape), truth).mean()), 4),
        # Median length of a held-out prediction over its true vector's, before and after the rescale.
        "holdout_norm_ratio": round(float(np.median(np.linalg.norm(raw, axis=1) / np.maximum(true_norms, 1e-12))), 4),
        "holdout_scaled_norm_ratio": round(
            float(np.median(np.linalg.norm(scaled, axis=1) / np.maximum(true_norms, 1e-12))), 4
        ),
    }
    return ContentMap(weights, mean, predicted_norms, batch_norms), figures


def _fit(contents: Sequence[ItemContent], factors: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of the factors on the content features: (XᵀX + damping²·I) W = Xᵀ(Y − mean), by
    conjugate gradients over the features that occur, all factors at once (each step two sparse
    products; XᵀX is never formed). Returns (W, mean) in float32."""
    x = feature_matrix(contents)
    y = factors.astype(np.float64)
    mean = y.mean(axis=0) if len(y) else np.zeros(factors.shape[1])
    weights = np.zeros((DIMENSION, factors.shape[1]), dtype=np.float32)
    used = np.unique(x.indices)
    if len(y) and len(used):
        weights[used] = _ridge_cg(x[:, used].tocsr(), y - mean, damping**2)
    return weights, mean.astype(np.float32)


def _quantiles(values: np.ndarray) -> np.ndarray:
    """The values at NORM_QUANTILES evenly spaced quantiles (non-decreasing, as np.interp needs)."""
    if len(values) == 0:
        return np.zeros(0, np.float32)
    return np.quantile(values, np.linspace(0.0, 1.0, NORM_QUANTILES)).astype(np.float32)


def _ridge_cg(x: sp.csr_matrix, y: np.ndarray, lam: float, tol: float = 1e-5, max_steps: int = 500) -> np.ndarray:
    """W minimising ‖XW − Y‖² + lam‖W‖², one CG per column of Y run side by side."""
    xt = x.T.tocsr()
    b = xt @ y
    w = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = np.einsum("ij,ij->j", r, r)
    stop = tol**2 * np.maximum(rr, 1e-30)
    for _ in range(max_steps):
        if np.all(rr <= stop):
            break
        ap = xt @ (x @ p) + lam * p
        step = rr / np.maximum(np.einsum("ij,ij->j", p, ap), 1e-30)
        w += p * step
        r -= ap * step
        rr_next = np.einsum("ij,ij->j", r, r)
        p = r + p * (rr_next / np.maximum(rr, 1e-30))
        rr = rr_next
    return w


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("nk,nk->n", a, b) / np.maximum(norms, 1e-12)


def _char_grams(word: str, n: int = 3) -> list[str]:
    padded = f"<{word}>"
    return [padded[i : i + n] for i in range(max(1, len(padded) - n + 1))]
