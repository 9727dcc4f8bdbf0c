"""Drift monitoring: PSI and KS against scipy on known distributions, the capped sample, and a real shift.

The shift runs through the real API on real Redis: visitors browse (speed state seeded as the speed
layer writes it), the ranker's pools are sampled into the capped stream, and `recs drift report`
compares them with the version's baseline. A stream like the baseline's raises nothing; one whose
category mix moved marks the version and turns the API's gauges on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from scipy import stats
from typer.testing import CliRunner

from bench.serve import SyntheticModel
from common import drift, redis_keys
from common.features import FEATURE_NAMES
from common.registry import ARTIFACT_FILES, DRIFT_BASELINE, DRIFT_MARKER, Manifest, Registry
from common.settings import DriftSettings, get_settings, load_settings
from serving.main import create_app
from tests.test_serving_support import make_settings, recs, seed_session_view

pytest_plugins = ["tests.test_serving_support"]

N_CATEGORIES = 8  # bench.serve's synthetic model: item j is in category j % 8


# ---------------------------------------------------------------- statistics against scipy


def test_psi_is_the_symmetrised_kl_divergence_scipy_computes() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, q = rng.dirichlet(np.ones(10)), rng.dirichlet(np.ones(10))
        p, q = (p + 0.01) / 1.1, (q + 0.01) / 1.1  # no share under the floor
        assert drift.psi(p, q) == pytest.approx(stats.entropy(p, q) + stats.entropy(q, p), rel=1e-9)
    assert drift.psi(p, p) == 0.0


def test_psi_of_sampled_normals_matches_the_exact_binned_value() -> None:
    rng = np.random.default_rng(2)
    base, shifted, same = rng.normal(0, 1, 200_000), rng.normal(0.5, 1, 200_000), rng.normal(0, 1, 200_000)
    edges = drift.quantile_edges(base, 10)
    assert edges == pytest.approx(stats.norm.ppf(np.arange(1, 10) / 10), abs=0.02)  # the deciles of N(0, 1)
    # The exact shares of N(0, 1) and N(0.5, 1) in those bins, from scipy's CDF.
    exact = drift.psi(*(np.diff(np.concatenate([[0.0], stats.norm.cdf(edges, loc=mu), [1.0]])) for mu in (0, 0.5)))
    measured = drift.psi(drift.shares(base, edges), drift.shares(shifted, edges))
    assert measured == pytest.approx(exact, abs=0.01)  # sampling noise of 200k draws: a few thousandths
    assert 0.2 < measured < 0.25  # binned below the continuous Jeffreys divergence, mu^2 = 0.25
    assert drift.psi(drift.shares(base, edges), drift.shares(same, edges)) < 0.001


def test_ks_statistic_equals_scipys_with_ties_and_the_normal_shift() -> None:
    rng = np.random.default_rng(3)
    for x, y in (
        (rng.normal(0, 1, 500), rng.normal(0.3, 1.2, 700)),
        (rng.integers(0, 5, 400).astype(float), rng.integers(0, 6, 300).astype(float)),  # many ties
        (rng.exponential(1, 50), rng.exponential(1, 50)),
    ):
        assert drift.ks_statistic(x, y) == pytest.approx(stats.ks_2samp(x, y).statistic, abs=1e-12)
    x, y = rng.normal(0, 1, 100_000), rng.normal(0.5, 1, 100_000)
    assert drift.ks_statistic(x, y) == pytest.approx(2 * stats.norm.cdf(0.25) - 1, abs=0.01)


def test_a_binary_feature_bins_by_value_and_an_unchanged_one_scores_zero() -> None:
    rng = np.random.default_rng(4)
    base = (rng.random(10_000) < 0.3).astype(np.float32)
    edges = drift.quantile_edges(base, 10)
    assert edges.tolist() == [0.0, 1.0]  # repeated quantiles merge: one bin per value
    assert drift.shares(base, edges)[1:] == pytest.approx([0.7, 0.3], abs=0.02)
    assert drift.psi(drift.shares(base, edges), drift.shares(base, edges)) == 0.0


# ---------------------------------------------------------------- bounded samples


def _sample(at_s: float, rows: int, rng: np.random.Generator) -> drift.PoolSample:
    return drift.pool_sample(
        rng.normal(size=(rows, len(FEATURE_NAMES))), rng.normal(size=rows), 32, rng,
        at_s=at_s, model_version="v1", context="home", cold_start=False, categories=["cat1", "cat2"],
    )  # fmt: skip


def test_the_served_sample_is_capped_and_keeps_the_newest(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(5)
    for n in range(60):
        drift.log_served(redis_client, _sample(float(n), 200, rng), max_requests=25)
    assert redis_client.xlen(redis_keys.DRIFT_SAMPLE) == 25
    kept = drift.read_served(redis_client)
    assert [s.at_s for s in kept] == [float(n) for n in range(35, 60)]
    assert all(s.features.shape == (32, len(FEATURE_NAMES)) and len(s.scores) == 32 for s in kept)
    assert drift.read_served(redis_client, version="v2") == []


def test_the_training_baseline_is_bounded_and_its_hash_is_in_the_manifest(registry: Registry) -> None:
    rng = np.random.default_rng(6)
    groups = [int(g) for g in rng.integers(5, 120, 400)]
    rows = sum(groups)
    categories = [f"cat{c}" for c in rng.integers(0, 4, rows)]
    settings = DriftSettings(baseline_rows=1000, rows_per_request=20)
    samples = drift.training_sample(
        rng.normal(size=(rows, len(FEATURE_NAMES))).astype(np.float32), rng.normal(size=rows), groups, categories,
        [bool(c) for c in rng.integers(0, 2, len(groups))], [0.0] * len(groups), settings, seed=1,
    )  # fmt: skip
    kept = sum(len(s.scores) for s in samples)
    assert 1000 <= kept < 1000 + 20 and all(len(s.scores) <= 20 for s in samples)
    assert all(len(s.categories) == min(drift.SERVED_K, len(s.categories)) for s in samples)

    drift.save_baseline(registry, "v1", samples)
    at = datetime(2026, 11, 1, tzinfo=UTC)
    registry.write_manifest(Manifest(version="v1", created_at=at, cutoff=at, engine="implicit"))
    assert DRIFT_BASELINE in ARTIFACT_FILES and DRIFT_BASELINE in registry.read_manifest("v1").files
    back = drift.load_baseline(registry, "v1")
    assert back is not None and len(back) == len(samples)
    assert np.array_equal(back[3].features, samples[3].features) and back[3].categories == samples[3].categories


# ---------------------------------------------------------------- a real shift through the API


@pytest.fixture
def drift_env(
    published: SyntheticModel, recs_env: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[TestClient, SyntheticModel]]:
    """The app sampling every ranker-scored list, every person in the ranker variant; a test may pass
    other settings (indirect parametrisation: env name -> value)."""
    env = {
        "RECS_DRIFT__SAMPLE_RATE": "1",
        "RECS_DRIFT__MIN_REQUESTS": "100",
        "RECS_EXPERIMENTS__SHARES": json.dumps({"ranker": 1.0}),
        "RECS_EXPERIMENTS__CONTROL": "ranker",
        **getattr(request, "param", {}),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client, published


HALF_RANKER_CAP_30 = {
    "RECS_EXPERIMENTS__SHARES": json.dumps({"ranker": 0.5, "popular": 0.5}),
    "RECS_EXPERIMENTS__CONTROL": "popular",
    "RECS_DRIFT__SAMPLE_REQUESTS": "30",
}


@pytest.mark.parametrize("drift_env", [HALF_RANKER_CAP_30], indirect=True)
def test_the_api_samples_ranker_lists_with_analytics_consent_into_the_capped_stream(
    drift_env: tuple[TestClient, SyntheticModel], redis_client: redis.Redis
) -> None:
    client, _ = drift_env
    variants = [recs(client, anonymous_id=f"cap-{n}", k=10)["variant"] for n in range(100)]
    assert 30 < variants.count("ranker") < 100  # both variants served, more ranker lists than the cap
    assert redis_client.xlen(redis_keys.DRIFT_SAMPLE) == 30  # drift.sample_requests, the oldest dropped
    before = redis_client.xrange(redis_keys.DRIFT_SAMPLE)
    for n in range(20):  # without analytics consent nothing is logged, as no impression is
        recs(client, anonymous_id=f"cap-{n}", k=10, consent="none")
    assert redis_client.xrange(redis_keys.DRIFT_SAMPLE) == before
    samples = drift.read_served(redis_client)
    assert all(s.model_version == "v1" and len(s.categories) == 10 and s.cold_start for s in samples)
    assert all(10 <= len(s.scores) <= 32 and s.features.shape == (len(s.scores), len(FEATURE_NAMES)) for s in samples)


def browse_and_ask(
    client: TestClient, redis_client: redis.Redis, model: SyntheticModel, categories: list[int], tag: str, seed: int
) -> None:
    """One anonymous visitor per entry of `categories`: views three items of it, then asks for a home list."""
    rng = np.random.default_rng(seed)
    per_category = len(model.item_ids) // N_CATEGORIES
    for n, category in enumerate(categories):
        person, session = f"{tag}-{n}", f"{tag}-s{n}"
        for rank in rng.choice(per_category, 3, replace=False):
            item = model.item_ids[category + N_CATEGORIES * int(rank)]
            seed_session_view(redis_client, person, session, item, f"cat{category}", {})
        recs(client, anonymous_id=person, session_id=session, k=10)


def test_a_shifted_category_mix_marks_the_version_and_an_unchanged_one_does_not(
    drift_env: tuple[TestClient, SyntheticModel], redis_client: redis.Redis, tmp_path: Path
) -> None:
    client, model = drift_env
    settings = load_settings()
    registry = Registry(settings.models.root)
    uniform = [n % N_CATEGORIES for n in range(160)]
    # The training window's traffic: its sampled pools stand in for the baseline training keeps.
    browse_and_ask(client, redis_client, model, uniform, "train", seed=1)
    drift.save_baseline(registry, model.version, drift.read_served(redis_client, version=model.version))

    from warehouse.drift import check

    since = time.time()
    browse_and_ask(client, redis_client, model, uniform, "same", seed=2)
    steady = check(settings, tmp_path / "steady", since=_at(since))
    assert steady.report.served_requests == 160 and steady.report.note is None
    assert not steady.report.drifted, steady.report.reasons
    assert steady.report.categories.psi < 0.05 and steady.report.psi_max < settings.drift.psi_threshold
    assert registry.drift_marker(model.version) is None and not steady.newly_marked
    assert _gauges(client) == (pytest.approx(steady.report.psi_max), 0.0)

    since = time.time()
    browse_and_ask(client, redis_client, model, [n % 2 for n in range(160)], "shifted", seed=3)  # cat0 and cat1
    shifted = check(settings, tmp_path / "shifted", since=_at(since))
    assert shifted.report.drifted and shifted.newly_marked
    assert any(r.startswith(drift.CATEGORIES) for r in shifted.report.reasons)
    mix = dict(zip(shifted.report.category_names, shifted.report.categories.served, strict=True))
    assert mix["cat0"] + mix["cat1"] > 0.5
    marker = registry.drift_marker(model.version)
    assert marker is not None and marker.drifted and (Path(settings.models.root) / "v1" / DRIFT_MARKER).exists()
    assert registry.read_manifest(model.version).status == "published"  # the manifest is not rewritten
    assert json.loads(shifted.json_path.read_text())["drifted"] is True
    assert 'id="categories"' in shifted.html_path.read_text()
    client.app.state.serving.drift.ttl_s = 0  # type: ignore[attr-defined]  # read the registry again now
    assert _gauges(client) == (pytest.approx(shifted.report.psi_max), 1.0)

    again = check(settings, tmp_path / "again", since=_at(since))
    assert again.report.drifted and not again.newly_marked  # marked once: one retrain, not one per check
    from recs.main import app

    listing = CliRunner().invoke(app, ["model", "list"]).output
    assert re.search(r"^\* v1 .* DRIFTED .*\(category mix: PSI", listing, re.MULTILINE), listing


def test_recs_drift_report_prints_the_table_and_writes_beside_the_report(
    drift_env: tuple[TestClient, SyntheticModel], redis_client: redis.Redis, tmp_path: Path
) -> None:
    from recs.main import app

    client, model = drift_env
    registry = Registry(load_settings().models.root)
    browse_and_ask(client, redis_client, model, [n % N_CATEGORIES for n in range(40)], "cli", seed=4)
    drift.save_baseline(registry, model.version, drift.read_served(redis_client))
    result = CliRunner().invoke(app, ["drift", "report", "--since", "1h", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert re.search(r"^category mix\s+0\.000\s", result.stdout, re.MULTILINE)  # the same sample on both sides
    assert "not judged" in result.stdout  # 40 sampled requests, fewer than min_requests
    assert (tmp_path / "drift.json").exists() and (tmp_path / "drift.html").exists()
    assert registry.latest_drift(model.version) is None  # an unjudged check records nothing
    bad = CliRunner().invoke(app, ["drift", "report", "--since", "yesterday"])
    assert bad.exit_code == 2 and "neither a duration" in bad.output


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def _gauges(client: TestClient) -> tuple[float, float]:
    text = client.get("/metrics").text
    values = {
        name: float(m.group(1))
        for name in ("recs_model_drift_psi_max", "recs_model_drifted")
        if (m := re.search(rf"^{name} (\S+)$", text, re.MULTILINE))
    }
    return values["recs_model_drift_psi_max"], values["recs_model_drifted"]


def test_a_feature_creeping_far_below_its_spread_is_not_drift_but_a_real_shift_is() -> None:
    rng = np.random.default_rng(7)
    settings = DriftSettings(min_requests=1)

    def samples(age: np.ndarray, share: np.ndarray) -> list[drift.PoolSample]:
        x = np.zeros((len(age), len(FEATURE_NAMES)), np.float32)
        x[:, FEATURE_NAMES.index("item_age_days")] = age
        x[:, FEATURE_NAMES.index("covis_share")] = share
        return [drift.PoolSample(0.0, "v1", "home", False, ["cat0"], x, np.zeros(len(age), np.float32))]

    # 95 % of items 90 days old (to the second of the request), 5 % new; covis_share mostly 0.
    def ages(offset_s: float) -> np.ndarray:
        old = 90 + (offset_s + rng.uniform(0, 60, 4750)) / 86_400
        return np.concatenate([old, rng.uniform(0, 14, 250)]).astype(np.float32)

    def covis(p_nonzero: float) -> np.ndarray:
        return np.where(rng.random(5000) < p_nonzero, rng.random(5000), 0.0).astype(np.float32)

    base = samples(ages(0), covis(0.05))
    later = drift.compare(base, samples(ages(600), covis(0.05)), settings, "v1")
    by_name = {d.name: d for d in later.features}
    assert by_name["item_age_days"].psi < 0.01 and by_name["covis_share"].psi < 0.05 and not later.drifted
    moved = drift.compare(base, samples(ages(30 * 86_400), covis(0.4)), settings, "v1")
    by_name = {d.name: d for d in moved.features}
    assert by_name["item_age_days"].psi > 1 and by_name["covis_share"].psi > 0.5 and moved.drifted  # 5 % -> 40 % nonzero: 0.89
