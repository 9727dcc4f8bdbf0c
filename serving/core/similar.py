"""Similar items: the item's co-visits blended with vector similarity (ALS factors, or content vectors for
items new since the cutoff), each answer saying which of them found it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from common.candidates import top_n_indices
from serving.core.model_holder import ServingModel

COVIS = "covis"  # viewed or bought together (batch table plus the speed layer's live counts)
CONTENT = "content"  # vector similarity where either item's vector came from its content
ALS = "als"  # vector similarity of two batch vectors: the same shoppers engaged with both
REASONS = {
    COVIS: "often viewed together",
    CONTENT: "similar title and category",
    ALS: "liked by the same shoppers",
}


@dataclass(frozen=True)
class Similar:
    item_id: str
    score: float
    source: str  # the larger part of the score: COVIS, CONTENT or ALS

    @property
    def reason(self) -> str:
        return REASONS[self.source]


def similar_items(
    model: ServingModel,
    item_id: str,
    covisits: Mapping[str, float],
    excluded: Callable[[str], bool],
    k: int,
) -> list[Similar] | None:
    """The k best items by cosine of vectors + co-visit share (an item's co-visits over the row's largest),
    best first; None when the item has neither a vector nor co-visits. `excluded`: items never shown."""
    artifacts = model.artifacts
    row = artifacts.item_index.get(item_id)
    if row is None and not covisits:
        return None
    top = max(covisits.values(), default=0.0)
    shares = {other: count / top for other, count in covisits.items() if other != item_id and top > 0}
    cosines: dict[str, float] = {}
    if row is not None:
        scores = model.unit_factors @ model.unit_factors[row]
        scores[row] = -np.inf
        n = min(len(scores), 3 * k + len(shares) + 1)  # over-fetch: some are excluded
        # A sampled bound, then a partition of the few hundred over it: a full partition of 50k costs ~10x.
        best = top_n_indices(scores, n).tolist()
        cosines = {artifacts.item_ids[i]: float(scores[i]) for i in best if np.isfinite(scores[i])}
        for other in shares:  # a co-visited item's similarity counts even outside the vector top n
            i = artifacts.item_index.get(other)
            if i is not None and other not in cosines:
                cosines[other] = float(scores[i])
    anchor_is_content = artifacts.is_content_vector(item_id)
    out = []
    for other in set(cosines) | set(shares):
        if excluded(other):
            continue
        cosine, share = max(cosines.get(other, 0.0), 0.0), shares.get(other, 0.0)
        if share > cosine:
            source = COVIS
        elif anchor_is_content or artifacts.is_content_vector(other):
            source = CONTENT
        else:
            source = ALS
        out.append(Similar(other, cosine + share, source))
    out.sort(key=lambda s: (-s.score, s.item_id))
    return out[:k]


def merged_covisits(batch: Mapping[str, float], live: Collection[tuple[str, float]]) -> dict[str, float]:
    """The batch table's row with the speed layer's live counts added (as the recommendations' lookups do)."""
    merged = dict(batch)
    for other, count in live:
        merged[other] = merged.get(other, 0.0) + count
    return merged
