"""Vector math shared by the speed layer, serving and training: unit rows (cosines), ALS fold-in and the
streaming SGD step.

Conventions (see DESIGN.md, "The lambda merge"): confidence c = 1 + alpha * r for an
observed item with implicit weight r; lambda is not scaled by the user's count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unit_rows(factors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity as a dot product); rows of zeros stay zeros."""
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    return (factors / np.maximum(norms, 1e-12)).astype(np.float32)


def gramian(item_factors: np.ndarray) -> np.ndarray:
    """YᵀY, precomputed once per model version."""
    y = item_factors.astype(np.float64, copy=False)
    return y.T @ y


def fold_in(
    item_factors: np.ndarray,
    yty: np.ndarray,
    item_indices: Sequence[int],
    weights: Sequence[float],
    alpha: float,
    regularization: float,
) -> np.ndarray:
    """Closed-form ALS user vector for the items seen so far.

    x = (YᵀY + Yᵀ(Cᵤ − I)Y + λI)⁻¹ Yᵀ Cᵤ p(u), with Cᵤ = 1 + alpha·r on observed items.
    Equals implicit's `recalculate_user` when it is fed r + 1/alpha (implicit uses c = alpha·r).
    """
    k = item_factors.shape[1]
    if len(item_indices) == 0:
        return np.zeros(k, dtype=np.float32)
    idx = np.asarray(item_indices, dtype=np.int64)
    r = np.asarray(weights, dtype=np.float64)
    y = item_factors[idx].astype(np.float64)
    confidence = 1.0 + alpha * r
    a = yty + (y.T * (confidence - 1.0)) @ y
    a.flat[:: k + 1] += regularization  # + λI: the diagonal alone (adding λ·I's zeros changes no entry)
    b = y.T @ confidence
    return np.linalg.solve(a, b).astype(np.float32)


def sgd_step(
    batch_vector: np.ndarray,
    delta: np.ndarray,
    positive: np.ndarray,
    negatives: np.ndarray,
    confidence: float,
    learning_rate: float,
    l2: float,
    max_norm: float,
) -> np.ndarray:
    """One streaming SGD update of the delta δ for an event on an item with factor `positive`.

    δ ← δ + η·[c·(1 − xᵀyᵢ)·yᵢ − Σⱼ (xᵀyⱼ)·yⱼ − λ·δ], x = x(u) + δ, then ‖δ‖ ≤ max_norm.
    The L2 term pulls δ toward zero, i.e. the user vector toward the batch one.
    """
    return sgd_steps(
        batch_vector[None, :], delta[None, :], positive[None, :], negatives[None, :, :],
        np.array([confidence]), learning_rate, l2, max_norm,
    )[0]  # fmt: skip


def sgd_steps(
    batch_vectors: np.ndarray,
    deltas: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    confidences: np.ndarray,
    learning_rate: float,
    l2: float,
    max_norm: float,
) -> np.ndarray:
    """`sgd_step` for n different users at once: rows of (n, k) arrays, negatives (n, m, k).

    One row per user: a user's second event must start from the delta of their first.
    """
    x = batch_vectors + deltas
    errors = 1.0 - np.einsum("nk,nk->n", x, positives)
    grads = (confidences * errors)[:, None] * positives - l2 * deltas
    if negatives.shape[1]:
        negative_scores = np.einsum("nmk,nk->nm", negatives, x)
        grads -= np.einsum("nm,nmk->nk", negative_scores, negatives)
    updated = deltas + learning_rate * grads
    norms = np.sqrt(np.einsum("nk,nk->n", updated, updated))
    scale = np.minimum(1.0, max_norm / np.maximum(norms, 1e-30))
    return (updated * scale[:, None]).astype(np.float32)
