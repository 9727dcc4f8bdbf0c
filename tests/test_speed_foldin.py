"""The fold-in in common.vectors equals implicit's exact recalculate_user on the same factors."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from common.vectors import fold_in, gramian


def test_fold_in_equals_implicit_recalculate_user() -> None:
    rng = np.random.default_rng(7)
    items, k, alpha, reg = 300, 16, 10.0, 0.05
    item_factors = rng.normal(scale=0.3, size=(items, k)).astype(np.float32)
    seen = rng.choice(items, size=12, replace=False)
    weights = rng.uniform(1.0, 6.0, size=12)

    model = AlternatingLeastSquares(factors=k, regularization=reg, alpha=alpha, use_cg=False, random_state=0)
    model.item_factors = item_factors
    model.user_factors = np.zeros((1, k), dtype=np.float32)
    # implicit's confidence is alpha·r; feeding r + 1/alpha gives ours, 1 + alpha·r. λ is unscaled in both.
    row = sp.csr_matrix((weights + 1.0 / alpha, (np.zeros(12, dtype=int), seen)), shape=(1, items))
    expected = np.asarray(model.recalculate_user(0, row)).ravel()

    ours = fold_in(item_factors, gramian(item_factors), seen.tolist(), weights.tolist(), alpha, reg)
    assert np.abs(ours - expected).max() < 1e-4
    assert np.abs(ours).max() > 0.1  # a real vector, not two zeros agreeing
