"""The version's precomputed top items of each person (common/model.py: BatchTops) and the ALS top n they
short-cut (common/candidates.py: als_top_n_listed): the same answer as scoring every item, for any speed
delta, with content rows beside the batch rows, and never for an erased person; serving counts how each
ALS list was found."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import publish_synthetic_model
from common.candidates import KnownTop, als_top_n, als_top_n_listed, sample_rows
from common.lake import Lake
from common.model import _highest_columns, batch_tops, forget_users, load_model, save_factors
from common.registry import TOP_FLOORS, TOP_ROWS, Manifest, Registry
from common.settings import TrainingSettings
from serving.main import create_app
from tests.test_serving_support import make_settings, recs

# The fixtures (published, client) live in the support module.
pytest_plugins = ["tests.test_serving_support"]

CUTOFF = datetime(2026, 11, 1, tzinfo=UTC)
N = 40  # the default ALS pool
KEPT = TrainingSettings().top_items_kept


@pytest.fixture
def registry(tmp_path: object) -> Registry:
    return Registry(str(tmp_path))


def clustered(rng: np.random.Generator, rows: int, clusters: int, factors: int) -> np.ndarray:
    """Factors around a few centres, as ALS's are around a store's departments: many near ties at the top."""
    centres = rng.normal(0, 1, (clusters, factors))
    return ((centres[np.arange(rows) % clusters] + 0.5 * rng.normal(0, 1, (rows, factors))) / np.sqrt(factors)).astype(
        np.float32
    )


def publish(registry: Registry, users: np.ndarray, items: np.ndarray, kept: int = KEPT) -> None:
    user_ids = [f"u{u}" for u in range(len(users))]
    save_factors(registry, "v1", user_ids, users, [f"i{j}" for j in range(len(items))], items, top_items=kept)
    registry.write_manifest(Manifest(version="v1", created_at=CUTOFF, cutoff=CUTOFF, engine="implicit", status="candidate"))


def test_the_top_n_from_a_persons_list_is_the_full_scans_whatever_the_delta(registry: Registry) -> None:
    rng = np.random.default_rng(3)
    centres = rng.normal(0, 1, (30, 32))
    items = clustered(rng, 20_000, 30, 32)
    users = ((centres[np.arange(200) % 30] + 0.5 * rng.normal(0, 1, (200, 32))) / np.sqrt(32)).astype(np.float32)
    publish(registry, users, items)
    model = load_model(registry, "v1")
    assert model.tops is not None and model.tops.rows.shape == (200, KEPT)

    short_cut = {}
    for share in (0.0, 0.02, 0.1, 1.0):  # the delta's norm as a share of the batch vector's
        taken = 0
        for u in range(200):
            direction = rng.normal(0, 1, 32)
            delta = (direction / np.linalg.norm(direction) * share * np.linalg.norm(users[u])).astype(np.float32)
            vector = users[u] + delta
            known = model.known_top(f"u{u}", delta)
            assert known is not None
            full = als_top_n(vector, model.scan_blocks, model.item_ids, N)
            listed = als_top_n_listed(vector, model.scan_blocks, model.item_ids, N, known)
            if listed is None:
                continue
            taken += 1
            assert [i for i, _ in listed] == [i for i, _ in full]
            np.testing.assert_allclose([s for _, s in listed], [s for _, s in full], rtol=1e-6)
        short_cut[share] = taken
    # Without a delta and with a small one the list settles it; a delta as long as the vector itself
    # leaves the ceiling above the list's n-th score, so the answer comes from every item.
    assert short_cut[0.0] == 200 and short_cut[0.02] > 150
    assert short_cut[1.0] < short_cut[0.1] < short_cut[0.02]


def test_a_ceiling_no_list_beats_gives_no_listed_answer() -> None:
    rng = np.random.default_rng(5)
    items = rng.normal(0, 1, (1_000, 8)).astype(np.float32)
    vector = rng.normal(0, 1, 8).astype(np.float32)
    ids = [f"i{j}" for j in range(1_000)]
    worst = np.argsort(items @ vector)[:N]  # a list of the lowest scores: its n-th never beats a real ceiling
    known = KnownTop(worst, float((items @ vector).max()))
    assert als_top_n_listed(vector, items, ids, N, known) is None


def test_content_rows_of_new_items_are_scored_beside_the_persons_list(registry: Registry) -> None:
    """Items new since the cutoff have content vectors stacked after the batch rows (ModelArtifacts.
    with_content_vectors): no precomputed list holds them, so each request scores them all."""
    rng = np.random.default_rng(7)
    items = clustered(rng, 2_000, 10, 16)
    users = clustered(rng, 20, 10, 16)
    publish(registry, users, items)
    model = load_model(registry, "v1")
    # A new item whose vector is the person's own direction, scaled past every batch item's score.
    new_row = 3 * users[0] / np.linalg.norm(users[0])
    stacked = replace(
        model,
        item_ids=model.item_ids + ["new"],
        item_factors=np.vstack([model.item_factors, new_row]).astype(np.float32),
        loaded_batch_rows=model.item_factors,
        batch_items=len(model.item_ids),
    )
    assert len(stacked.scan_blocks) == 2
    known = stacked.known_top("u0", None)
    assert known is not None
    listed = als_top_n_listed(users[0], stacked.scan_blocks, stacked.item_ids, N, known)
    assert listed is not None and listed[0][0] == "new"
    assert listed == als_top_n(users[0], stacked.scan_blocks, stacked.item_ids, N)


def test_an_erased_persons_list_is_blanked_and_the_version_still_verifies(registry: Registry) -> None:
    rng = np.random.default_rng(9)
    publish(registry, clustered(rng, 30, 5, 8), clustered(rng, 1_000, 5, 8))
    before = load_model(registry, "v1")
    assert before.known_top("u3", None) is not None
    assert forget_users(registry, "v1", {"u3"}) == 1
    registry.verify("v1")  # the lists' files are in the manifest, re-hashed
    after = load_model(registry, "v1")
    assert after.tops is not None
    assert np.isnan(after.tops.floors[3]) and not after.tops.rows[3].any()
    assert after.known_top("", None) is None  # the row's id is blanked; nothing names it
    assert after.known_top("u4", None) is not None


@pytest.mark.parametrize(("items", "kept"), [(KEPT, KEPT), (KEPT + 1, 0)], ids=["catalog-no-larger", "setting-off"])
def test_a_catalog_no_larger_than_a_list_or_a_list_of_none_gets_no_lists(registry: Registry, items: int, kept: int) -> None:
    rng = np.random.default_rng(11)
    publish(registry, clustered(rng, 10, 3, 8), clustered(rng, items, 3, 8), kept)
    assert not registry.fs.exists(registry.path("v1", TOP_ROWS))
    assert not registry.fs.exists(registry.path("v1", TOP_FLOORS))
    assert load_model(registry, "v1").known_top("u0", None) is None


def test_a_shorter_list_still_gives_the_full_scans_answer_or_none(registry: Registry) -> None:
    rng = np.random.default_rng(17)
    users, items = clustered(rng, 50, 5, 16), clustered(rng, 5_000, 5, 16)
    publish(registry, users, items, kept=60)
    model = load_model(registry, "v1")
    assert model.tops is not None and model.tops.rows.shape == (50, 60)
    answered = 0
    for u in range(50):
        known = model.known_top(f"u{u}", None)
        assert known is not None
        listed = als_top_n_listed(users[u], model.scan_blocks, model.item_ids, N, known)
        if listed is not None:
            assert listed == als_top_n(users[u], model.scan_blocks, model.item_ids, N)
            answered += 1
        assert als_top_n_listed(users[u], model.scan_blocks, model.item_ids, 61, known) is None  # more than kept
    assert answered == 50  # no delta: the list's 40 best beat the floor of its 60th


def test_batch_tops_keeps_each_rows_highest_columns_and_their_lowest_score() -> None:
    rng = np.random.default_rng(13)
    users, items = rng.normal(0, 1, (300, 16)).astype(np.float32), rng.normal(0, 1, (40_000, 16)).astype(np.float32)
    tops = batch_tops(users, items, 400)
    scores = users @ items.T
    expected = np.argpartition(scores, 40_000 - 400, axis=1)[:, 40_000 - 400 :]
    for u in range(300):
        assert set(tops.rows[u].tolist()) == set(expected[u].tolist())
    np.testing.assert_array_equal(tops.floors, np.sort(scores, axis=1)[:, -400])



def test_rows_whose_sample_bound_keeps_too_few_columns_are_partitioned_whole() -> None:
    """A row whose high scores sit on the sampled columns: the sample's bound keeps ~33 columns, fewer than
    the 400 wanted, so that row takes the partition of every column."""
    rng = np.random.default_rng(17)
    scores = rng.normal(0, 1, (3, 40_000)).astype(np.float32)
    scores[1, sample_rows(40_000)] += 10.0
    top = _highest_columns(scores, 400)
    for row in range(3):
        expected = np.argpartition(scores[row], 40_000 - 400)[40_000 - 400 :]
        assert set(top[row].tolist()) == set(expected.tolist())
    assert set(top[1].tolist()) <= set(sample_rows(40_000).tolist())


def als_lists(client: TestClient) -> dict[str, float]:
    """recs_als_lists_total by `found`, from the app's /metrics."""
    counts = {"list": 0.0, "scan": 0.0}
    for line in client.get("/metrics").text.splitlines():
        for found in counts:
            prefix = f'recs_als_lists_total{{found="{found}"}} '
            if line.startswith(prefix):
                counts[found] = float(line[len(prefix) :])
    return counts


def test_serving_takes_a_known_users_als_list_from_their_top_items_and_counts_how(
    recs_env: Path, redis_client: redis.Redis
) -> None:
    publish_synthetic_model(
        Registry(str(recs_env / "models")), Lake(str(recs_env / "lake")), n_items=1_000, with_ranker=False
    )
    with TestClient(create_app(make_settings())) as client:
        before = als_lists(client)
        body = recs(client, user_id="u1", k=10)
        after = als_lists(client)
    assert body["degraded"] is None and len(body["items"]) == 10
    assert after["list"] - before["list"] == 1 and after["scan"] == before["scan"]


def test_on_a_catalog_without_lists_serving_scans_every_item(client: TestClient) -> None:
    before = als_lists(client)
    recs(client, user_id="u1", k=10)
    after = als_lists(client)
    assert after["scan"] - before["scan"] == 1 and after["list"] == before["list"]
