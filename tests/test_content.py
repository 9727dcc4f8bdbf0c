"""Content vectors (common/content.py): the map from item content into the ALS item space, and a model
version that scores items it has no batch vector for."""

from __future__ import annotations

import numpy as np

from common.candidates import als_top_n
from common.content import (
    DIMENSION,
    ItemContent,
    content_features,
    feature_matrix,
    fit_content_map,
)
from common.model import ModelArtifacts
from common.registry import Manifest

WORDS = {  # each category's own vocabulary; "new", "classic", "set" are shared noise
    "shoes": ["runner", "sneaker", "boot", "sole", "lace"],
    "phones": ["android", "screen", "camera", "battery", "dual"],
    "books": ["novel", "paperback", "edition", "author", "chapter"],
    "toys": ["puzzle", "plush", "blocks", "doll", "board"],
}
NOISE = ["new", "classic", "set", "deluxe"]


def catalog(n: int, factors: int, seed: int) -> tuple[list[ItemContent], np.ndarray]:
    """Items whose title words determine their category, and vectors that cluster by category."""
    rng = np.random.default_rng(seed)
    names = sorted(WORDS)
    centres = rng.normal(0, 1, (len(names), factors))
    category = rng.integers(len(names), size=n)
    contents = []
    for c in category:
        words = [*rng.choice(WORDS[names[c]], 2, replace=False), str(rng.choice(NOISE))]
        contents.append(ItemContent(title=" ".join(words), price=float(rng.uniform(5, 200))))
    vectors = centres[category] + 0.4 * rng.normal(0, 1, (n, factors))
    return contents, vectors.astype(np.float32)


def test_the_map_recovers_held_out_vectors_better_than_the_mean_vector() -> None:
    contents, vectors = catalog(600, 16, seed=3)
    _, scores = fit_content_map(contents, vectors, seed=1)
    assert scores["holdout_items"] > 30
    assert scores["holdout_cosine"] > 0.8 > scores["mean_vector_cosine"] + 0.3, scores


def test_predicted_vectors_are_rescaled_to_the_batch_vectors_norms() -> None:
    """Ridge shrinks predictions toward the mean; rescaled, unseen items are as long as batch items are."""
    contents, vectors = catalog(600, 16, seed=3)
    vectors *= np.random.default_rng(4).lognormal(0.0, 0.5, (len(vectors), 1)).astype(np.float32)  # norms vary
    content_map, scores = fit_content_map(contents, vectors, seed=1, damping=8.0)
    assert scores["holdout_norm_ratio"] < 0.8 and 0.85 < scores["holdout_scaled_norm_ratio"] < 1.15, scores
    fresh, _ = catalog(300, 16, seed=9)  # the same vocabulary, items the map never saw
    predicted = np.linalg.norm(content_map.vectors(fresh), axis=1)
    batch = np.linalg.norm(vectors, axis=1)
    assert 0.8 < np.median(predicted) / np.median(batch) < 1.25
    # Only lengths change, in order: a longer prediction stays longer, and directions are kept.
    raw = feature_matrix(fresh) @ content_map.weights + content_map.mean
    assert np.all(np.diff(predicted[np.argsort(np.linalg.norm(raw, axis=1))]) >= -1e-4)
    cosines = np.einsum("nk,nk->n", raw, content_map.vectors(fresh)) / (np.linalg.norm(raw, axis=1) * predicted)
    np.testing.assert_allclose(cosines, 1.0, rtol=1e-4)


def test_features_are_hashed_into_a_fixed_dimension_the_same_way_every_time() -> None:
    shoe = ItemContent("Trail Runner boot", ("Sports", "Shoes"), "Acme", 79.0)
    features = content_features(shoe)
    assert features == content_features(ItemContent("trail runner Boot 2", ("Sports", "Shoes"), "Acme", 79.0))
    assert all(0 <= bucket < DIMENSION for bucket in features)
    assert content_features(ItemContent(price=10.0)) != {} and not ItemContent(price=10.0).has_text


def version_with_content_map() -> tuple[ModelArtifacts, list[ItemContent], np.ndarray]:
    """A version of 200 items i0..i199 with 8 factors and a content map fitted on them; its contents, factors."""
    contents, vectors = catalog(200, 8, seed=5)
    content_map, _ = fit_content_map(contents, vectors)
    model = ModelArtifacts(
        version="v1", manifest=Manifest.model_construct(version="v1"), item_ids=[f"i{j}" for j in range(200)],
        item_factors=vectors, user_ids=[], user_factors=np.zeros((0, 8), np.float32), yty=np.eye(8),
        content_map=content_map,
    )  # fmt: skip
    return model, contents, vectors


def test_a_version_adds_content_vectors_only_for_items_without_a_batch_vector() -> None:
    model, contents, vectors = version_with_content_map()
    ids = model.item_ids
    fresh = ItemContent("sneaker lace new")
    extended = model.with_content_vectors({"i0": fresh, "new-1": fresh, "bare": ItemContent(price=3.0)})
    assert extended.item_ids == [*ids, "new-1"] and extended.batch_item_ids == ids
    np.testing.assert_array_equal(extended.item_vector("i0"), vectors[0])  # a batch vector is never replaced
    assert extended.is_content_vector("new-1") and not extended.has_batch_vector("new-1")
    shoes = [j for j, c in enumerate(contents) if "sneaker" in c.title or "runner" in c.title]
    similarity = vectors @ extended.item_vector("new-1")
    assert np.mean(similarity[shoes]) > np.mean(np.delete(similarity, shoes))
    # Changed content replaces the item's content vector; the batch rows stay where they were.
    again = extended.with_content_vectors({"new-1": ItemContent("novel paperback")})
    assert again.item_ids == extended.item_ids
    assert not np.allclose(again.item_vector("new-1"), extended.item_vector("new-1"))
    assert model.with_content_vectors({"i1": fresh}) is model


def test_a_version_with_content_vectors_scans_its_batch_rows_as_loaded_and_its_content_rows_apart() -> None:
    """The stack copies the batch rows; the ALS scan reads the loaded ones (the map a host's processes
    share, common/model.py) and then the content rows, and ranks every row as the stack would."""
    model, _, vectors = version_with_content_map()
    once = model.with_content_vectors({"new-1": ItemContent("sneaker lace new")})
    twice = once.with_content_vectors({"new-2": ItemContent("novel paperback"), "new-1": ItemContent("red sneaker")})
    for extended in (once, twice):
        loaded, content = extended.scan_blocks
        assert np.shares_memory(loaded, vectors) and not np.shares_memory(extended.item_factors, vectors)
        assert len(loaded) == 200 and np.shares_memory(content, extended.item_factors[200:])
        for vector in (extended.item_vector("new-1"), np.random.default_rng(3).standard_normal(8).astype(np.float32)):
            scanned = als_top_n(vector, extended.scan_blocks, extended.item_ids, 20)
            assert [i for i, _ in scanned] == [i for i, _ in als_top_n(vector, extended.item_factors, extended.item_ids, 20)]
        assert extended.similar_items("new-1", 5) is not None
    assert twice.scan_blocks[1].shape == (2, 8)
    assert len(model.scan_blocks) == 1 and model.scan_blocks[0] is model.item_factors
