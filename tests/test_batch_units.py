"""Batch layer without Spark or Airflow: the interactions rule, data quality, erasure, metrics, gate."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.events import (
    DEFAULT_CONSENT,
    Consent,
    Event,
    EventType,
    deterministic_event_id,
    events_to_table,
    table_to_events,
)
from common.features import (
    NO_HISTORY_DAYS,
    RequestState,
    decay,
    history_columns,
    implicit_weight,
    with_purchases_since,
)
from common.gatherer import seed_cosines
from common.ids import id_digest
from common.lake import EVENTS_DATASET, Lake
from common.model import forget_users, load_model, save_factors, save_history
from common.registry import Manifest, Registry
from common.settings import Settings, TrainingSettings
from spark_jobs import tables
from spark_jobs.erasure import apply_erasures
from spark_jobs.evaluate import mrr_at_k, ndcg_at_k, recall_at_k
from spark_jobs.gate import (
    PAIRED,
    REPLAY_CURRENT,
    REPLAY_FULL,
    REPLAY_OWN,
    REPLAY_VS_CURRENT,
    REPLAY_VS_OWN,
    decide,
    paired_bootstrap,
    paired_ranks,
    paired_reciprocal,
    ranker_loss,
)
from spark_jobs.interactions import local_interactions
from spark_jobs.quality import DataQualityError, validate_events
from spark_jobs.replay import load_log

CUTOFF = datetime(2026, 3, 10, tzinfo=UTC)
TRAINING = TrainingSettings()


def event(kind: str, at: datetime, anon: str, item: str | None = None, user: str | None = None, **extra: object) -> Event:
    """A received event (received_at = ts, as importers of history set it)."""
    return Event(
        event_id=deterministic_event_id(kind, at.isoformat(), anon, item, user, extra.get("dwell_ms")),
        event_type=EventType(kind),
        ts=at,
        received_at=at,
        anonymous_id=anon,
        user_id=user,
        session_id=str(extra.pop("session_id", f"s-{anon}")),
        item_id=item,
        **extra,  # type: ignore[arg-type]
    )


def daily_events(lake: Lake, days: int, per_day: int, end: datetime = CUTOFF) -> None:
    rows = []
    for d in range(days):
        day = end - timedelta(days=days - d)
        rows += [event("view", day + timedelta(minutes=i), f"a{i % 7}", f"i{i % 11}") for i in range(per_day)]
    lake.write_events(events_to_table(rows))


# ---------------------------------------------------------------- interactions


def test_interactions_weight_decay_and_identity(lake: Lake) -> None:
    t1 = CUTOFF - timedelta(days=30)
    t2 = CUTOFF - timedelta(days=1)
    lake.write_events(
        events_to_table(
            [
                event("view", t1, "dev1", "shoe", dwell_ms=90_000),  # anonymous, identified later
                event("identify", t2, "dev1", user="alice"),
                event("purchase", t2, "dev1", "shoe", user="alice"),
                event("view", t2, "dev2", "hat"),  # never identified: stays the device
                event("search", t2, "dev2", query="hats"),  # no item: ignored
                event("remove_from_cart", t2, "dev2", "hat"),  # weight 0: ignored
                event("hover", t2, "dev2", "scarf", dwell_ms=60_000),  # attention only: ignored
                event("view", CUTOFF + timedelta(seconds=1), "dev2", "hat"),  # after the cutoff
            ]
        )
    )
    got = {(r["person_id"], r["item_id"]): r["value"] for r in local_interactions(lake, CUTOFF, TRAINING).to_pylist()}
    half_life_s = TRAINING.half_life_days * 86_400
    expected_shoe = decay(implicit_weight("view", 90_000, TRAINING), 30 * 86_400, half_life_s) + decay(
        implicit_weight("purchase", None, TRAINING), 86_400, half_life_s
    )
    assert set(got) == {("alice", "shoe"), ("dev2", "hat")}
    assert got[("alice", "shoe")] == pytest.approx(expected_shoe, rel=1e-12)
    assert got[("dev2", "hat")] == pytest.approx(decay(1.0, 86_400, half_life_s), rel=1e-12)


def test_a_versions_history_counts_sessions_keeps_each_persons_best_and_an_erasure_empties_it(
    lake: Lake, registry: Registry
) -> None:
    day = CUTOFF - timedelta(days=3)
    lake.write_events(
        events_to_table(
            [
                event("view", day, "dev-a", "shoe", session_id="s1"),
                event("identify", day, "dev-a", user="alice", session_id="s1"),
                event("purchase", day + timedelta(minutes=1), "dev-a", "hat", user="alice", session_id="s1"),
                event("view", day + timedelta(hours=5), "dev-a", "shoe", user="alice", session_id="s2"),
                event("view", day + timedelta(hours=5, minutes=1), "dev-a", "shoe", user="alice", session_id="s2"),
                event("view", day + timedelta(hours=6), "dev-a", "scarf", user="alice", session_id="s2"),
                event("remove_from_cart", day + timedelta(hours=7), "dev-a", "belt", user="alice", session_id="s2"),
                event("view", day + timedelta(days=1), "phone", "shoe", user="alice", session_id="s3"),
                event("view", CUTOFF + timedelta(seconds=1), "phone", "sock", user="alice", session_id="s4"),
                event("view", day, "dev-b", "hat", session_id="s9"),
            ]
        )
    )
    interactions = local_interactions(lake, CUTOFF, TRAINING)
    people, items = sorted(set(interactions["person_id"].to_pylist())), sorted(set(interactions["item_id"].to_pylist()))
    save_factors(
        registry, "v1", people, np.ones((len(people), 2)), items, np.ones((len(items), 2)), top_items=TRAINING.top_items_kept
    )
    save_history(registry, "v1", interactions, kept=2)
    registry.write_manifest(Manifest(version="v1", created_at=CUTOFF, cutoff=CUTOFF, engine="implicit", status="candidate"))

    alice = load_model(registry, "v1").history_of("alice")
    # Three sessions with the shoe (two views in s2 count once); of the one-session items, the later one.
    assert alice == {"shoe": (3.0, (day + timedelta(days=1)).timestamp()), "scarf": (1.0, (day + timedelta(hours=6)).timestamp())}
    assert list(alice) == ["shoe", "scarf"]  # best first: the gatherer and the features read this order
    assert load_model(registry, "v1").history_of("dev-b") == {"hat": (1.0, day.timestamp())}

    assert forget_users(registry, "v1", {"alice"}) == 1
    registry.verify("v1")
    erased = load_model(registry, "v1")
    assert erased.history_of("alice") == {} and erased.history_of("dev-b") == {"hat": (1.0, day.timestamp())}
    history = erased.history
    assert history is not None
    assert int(np.count_nonzero(history.sessions)) == 1 and int(np.count_nonzero(history.last_s)) == 1


def test_a_loaded_versions_factors_are_its_files_mapped_read_only_and_an_erasure_leaves_them_whole(
    registry: Registry,
) -> None:
    """The processes of one host share a version's factors: each maps the version's file (common/model.py).
    An erasure renames new files into place, so a model loaded before it reads the factors it had, whole,
    and the next load reads the erased ones."""
    rng = np.random.default_rng(0)
    users, items = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    save_factors(
        registry, "v1", ["alice", "bob", "carol"], users, [f"i{j}" for j in range(5)], items, top_items=TRAINING.top_items_kept
    )
    registry.write_manifest(Manifest(version="v1", created_at=CUTOFF, cutoff=CUTOFF, engine="implicit", status="candidate"))

    first, second = load_model(registry, "v1"), load_model(registry, "v1")
    for name, array in (("item_factors.npy", first.item_factors), ("user_factors.npy", first.user_factors)):
        mapped = array.base  # a plain array over the map
        assert isinstance(mapped, np.memmap) and Path(str(mapped.filename)) == Path(registry.path("v1", name))
    assert isinstance(second.item_factors.base, np.memmap) and isinstance(first.item_factors.base, np.memmap)
    assert Path(str(second.item_factors.base.filename)) == Path(str(first.item_factors.base.filename))
    np.testing.assert_array_equal(first.item_factors, items.astype(np.float32))
    with pytest.raises(ValueError, match="read-only"):
        first.user_factors[0] = 0.0

    assert forget_users(registry, "v1", {"bob"}) == 1
    np.testing.assert_array_equal(first.user_factors, users.astype(np.float32))  # the file it opened
    erased = load_model(registry, "v1").user_factors
    np.testing.assert_array_equal(erased[1], np.zeros(4, np.float32))
    np.testing.assert_array_equal(erased[[0, 2]], users[[0, 2]].astype(np.float32))


def test_purchases_since_the_cutoff_join_the_versions_history() -> None:
    cutoff = CUTOFF.timestamp()
    history = {"shoe": (3.0, cutoff - 86_400), "hat": (1.0, cutoff - 3_600)}
    purchases = {"shoe": cutoff + 60, "sock": cutoff + 120, "hat": cutoff - 60}  # the hat's is the version's
    assert with_purchases_since(history, purchases, cutoff) == {
        "shoe": (4.0, cutoff + 60), "hat": (1.0, cutoff - 3_600), "sock": (1.0, cutoff + 120)
    }
    state = RequestState(now_s=cutoff + 86_400, history=with_purchases_since(history, purchases, cutoff))
    sessions, age_days = history_columns(state, ["sock", "shoe", "belt"])
    np.testing.assert_allclose(sessions, np.log1p([1.0, 4.0, 0.0]))
    np.testing.assert_allclose(age_days, [(86_400 - 120) / 86_400, (86_400 - 60) / 86_400, NO_HISTORY_DAYS])


def consent_lake(lake: Lake) -> None:
    """Events under each consent, and a file from before the consent column (read as the default)."""
    t = CUTOFF - timedelta(days=1)
    lake.write_events(
        events_to_table(
            [
                event("purchase", t, "dev-p", "shoe", consent=Consent.PERSONALISATION),
                event("purchase", t, "dev-a", "shoe", consent=Consent.ANALYTICS),
                event("purchase", t, "dev-n", "shoe", consent=Consent.NONE),
            ]
        )
    )
    old = events_to_table([event("view", t, "dev-old", "hat")]).drop_columns(["consent"])
    target = Path(lake.path("events", f"dt={t.date().isoformat()}", "part-old.parquet"))
    pq.write_table(old, target)


def test_only_personalisation_consent_builds_a_persons_interactions(lake: Lake) -> None:
    consent_lake(lake)
    got = {(r["person_id"], r["item_id"]) for r in local_interactions(lake, CUTOFF, TRAINING).to_pylist()}
    assert got == {("dev-p", "shoe"), ("dev-old", "hat")}


def test_a_hover_is_in_no_batch_table_or_event_log(lake: Lake) -> None:
    at = CUTOFF - timedelta(hours=1)
    rows = [
        event("view", at, "dev1", "shoe"),
        event("hover", at + timedelta(seconds=1), "dev1", "scarf", dwell_ms=4000),
        event("view", at + timedelta(seconds=2), "dev1", "hat"),
    ]
    lake.write_events(events_to_table(rows))
    events = lake.read_events(end=CUTOFF, columns=tables.SEQUENCE_COLUMNS)
    assert tables.popularity(events)["item_id"].to_pylist() == ["hat", "shoe"]
    assert [item for _, item, _ in tables.sequence_events(events)] == ["shoe", "hat"]  # hat follows shoe
    log = load_log(lake, CUTOFF, TRAINING)
    assert sorted(log.item_ids[i] for i in log.item) == ["hat", "shoe"]
    assert log.raw.num_rows == 2


def test_the_event_logs_rows_say_what_the_lake_does_with_one_string_per_distinct_value(lake: Lake) -> None:
    at = CUTOFF - timedelta(hours=2)
    rows = [
        event("view", at + timedelta(seconds=k), anon, item, user=user)
        for k, (anon, user, item) in enumerate([
            ("dev1", None, "shoe"), ("dev2", "ann", "hat"), ("dev1", None, "hat"), ("dev3", None, "scarf"), ("dev2", "ann", "shoe"),
        ])
    ]  # fmt: skip
    lake.write_events(events_to_table(rows))
    log = load_log(lake, CUTOFF, TRAINING)
    assert [log.item_ids[i] for i in log.item] == ["shoe", "hat", "hat", "scarf", "shoe"]
    assert list(log.person) == ["dev1", "ann", "dev1", "dev3", "ann"]
    assert list(log.session) == list(log.session_id) == ["s-dev1", "s-dev2", "s-dev1", "s-dev3", "s-dev2"]
    assert list(log.event_type) == ["view"] * 5
    # A person's rows hold one str between them, not one a row: a large log's memory is its distinct values.
    assert log.person[0] is log.person[2] and log.session[1] is log.session[4] and log.event_type[0] is log.event_type[3]


# ---------------------------------------------------------------- data quality


def test_validation_passes_a_healthy_lake(lake: Lake) -> None:
    daily_events(lake, days=8, per_day=20)
    reports = validate_events(lake, CUTOFF, volume_factor=5)
    assert [r.rows for r in reports] == [20] * 8


def test_validation_names_a_corrupt_partition(lake: Lake) -> None:
    daily_events(lake, days=8, per_day=20)
    day = (CUTOFF - timedelta(days=3)).date()
    path = lake.partition_files(EVENTS_DATASET, day)[0]
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataQualityError, match=rf"events/dt={day}: file part-.* is corrupt"):
        validate_events(lake, CUTOFF, volume_factor=5)


def test_validation_names_schema_drift_and_volume(lake: Lake) -> None:
    daily_events(lake, days=8, per_day=20)
    day = (CUTOFF - timedelta(days=2)).date()
    drifted = pa.table({"event_id": ["x"], "ts": pa.array([1], pa.int64())})
    pq.write_table(drifted, f"{lake.path('events', f'dt={day}')}/part-drift.parquet")
    with pytest.raises(DataQualityError, match=rf"events/dt={day}: file part-drift.parquet has schema drift \(.*ts is int64"):
        validate_events(lake, CUTOFF, volume_factor=5)

    other = Lake(lake.root + "-volume")
    daily_events(other, days=7, per_day=20, end=CUTOFF - timedelta(days=1))
    daily_events(other, days=1, per_day=200)  # ten times the trailing average
    with pytest.raises(DataQualityError, match=rf"events/dt={CUTOFF.date() - timedelta(days=1)} has 200 events, far off"):
        validate_events(other, CUTOFF, volume_factor=5)


def test_a_file_from_before_the_consent_column_is_valid_and_reads_as_the_default(lake: Lake) -> None:
    daily_events(lake, days=8, per_day=20)
    day = CUTOFF - timedelta(days=2)
    older = events_to_table([event("view", day, "a-old", "i1")]).drop_columns(["consent"])
    pq.write_table(older, f"{lake.path('events', f'dt={day.date()}')}/part-old.parquet")
    validate_events(lake, CUTOFF, volume_factor=5)  # not drift: the column was added since
    (read,) = [e for e in table_to_events(lake.read_events()) if e.anonymous_id == "a-old"]
    assert read.consent is DEFAULT_CONSENT


def test_validation_fails_when_the_last_day_is_missing(lake: Lake) -> None:
    daily_events(lake, days=5, per_day=10, end=CUTOFF - timedelta(days=2))
    with pytest.raises(DataQualityError, match=r"events/dt=2026-03-09 is missing"):
        validate_events(lake, CUTOFF, volume_factor=5)


# ---------------------------------------------------------------- erasure


def test_erasure_removes_the_user_and_their_devices_then_the_queue(lake: Lake) -> None:
    t = CUTOFF - timedelta(days=2)
    lake.write_events(
        events_to_table(
            [
                event("view", t, "dev1", "a"),  # pre-login, on alice's device
                event("identify", t + timedelta(minutes=1), "dev1", user="alice"),
                event("view", t + timedelta(days=1), "dev9", "b", user="alice"),
                event("view", t, "dev2", "a", user="bob"),
            ]
        )
    )
    lake.queue_erasure("alice")
    report = apply_erasures(lake)
    left = lake.read_events()
    assert report.users == ["alice"] and report.rows_removed == 3
    assert left["user_id"].to_pylist() == ["bob"]
    assert lake.pending_erasures() == []
    # The closed request is kept for serving as the id's digest and the time, never the id itself.
    assert list(lake.erasure_times()) == [id_digest("alice")]
    assert "alice" not in "".join(p.read_text() for p in Path(lake.path("erasures")).rglob("*") if p.is_file())
    assert apply_erasures(lake).rows_removed == 0  # nothing queued: nothing rewritten


def test_a_run_that_fails_validation_still_erases(lake: Lake, tmp_path: Path) -> None:
    from recs.nightly import run_all
    from spark_jobs.plan import make_plan

    t = CUTOFF - timedelta(days=3)  # the last day before the cutoff is missing: validation fails
    lake.write_events(events_to_table([event("view", t, "dev1", "a", user="alice"), event("view", t, "dev2", "a")]))
    lake.queue_erasure("alice")
    settings = Settings(var_dir=tmp_path, lake={"root": lake.root}, models={"root": str(tmp_path / "models")})  # type: ignore[arg-type]
    with pytest.raises(DataQualityError, match="is missing"):
        run_all(settings, make_plan(settings, CUTOFF, "implicit"), notify_redis=False)
    assert lake.pending_erasures() == [] and lake.read_events()["anonymous_id"].to_pylist() == ["dev2"]


def test_an_unreadable_partition_keeps_the_erasure_queued_after_erasing_the_rest(lake: Lake) -> None:
    from spark_jobs.erasure import ErasureIncomplete

    t = CUTOFF - timedelta(days=2)
    lake.write_events(events_to_table([event("view", t, "dev1", "a", user="alice"), event("view", t, "dev2", "a")]))
    lake.write_events(events_to_table([event("view", t + timedelta(days=1), "dev1", "b", user="alice")]))
    corrupt = lake.partition_files(EVENTS_DATASET, (t + timedelta(days=1)).date())[0]
    Path(corrupt).write_bytes(b"PAR1 not really parquet")
    lake.queue_erasure("alice")
    with pytest.raises(ErasureIncomplete, match=rf"cannot read events/dt={(t + timedelta(days=1)).date()}"):
        apply_erasures(lake)
    [kept] = lake.partition_files(EVENTS_DATASET, t.date())  # the readable day is erased all the same
    assert pq.read_table(kept)["anonymous_id"].to_pylist() == ["dev2"]
    assert [p["user_id"] for p in lake.pending_erasures()] == ["alice"]  # retried by the next run


# ---------------------------------------------------------------- ranker features


def test_seed_cosines_compare_each_candidate_with_the_last_seed_and_the_seeds_direction() -> None:
    candidates = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32)  # the last one has no vector
    half = np.sqrt(0.5)
    last, direction = seed_cosines(candidates, np.array([[0, 2], [3, 0]], np.float32))  # most recent first
    np.testing.assert_allclose(last, [0, 1, half, 0], atol=1e-6)
    np.testing.assert_allclose(direction, [half, half, 1, 0], atol=1e-6)  # lengths do not weigh: (1, 1)
    # A most recent seed without a vector: no last-seed cosine, the direction from the seeds that have one.
    last, direction = seed_cosines(candidates, np.array([[0, 0], [3, 0]], np.float32))
    np.testing.assert_allclose(last, [0, 0, 0, 0])
    np.testing.assert_allclose(direction, [1, 0, half, 0], atol=1e-6)
    for none in (np.zeros((0, 2), np.float32), np.zeros((2, 2), np.float32)):
        assert not np.any(seed_cosines(candidates, none)[0]) and not np.any(seed_cosines(candidates, none)[1])


# ---------------------------------------------------------------- metrics and gate


def test_ranking_metrics() -> None:
    ranked = ["x", "a", "y", "b"]
    assert recall_at_k(ranked, {"a", "b", "c", "d"}) == 0.5
    assert mrr_at_k(ranked, {"b"}) == 0.25
    assert ndcg_at_k(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    assert 0 < ndcg_at_k(ranked, {"a", "b"}) < 1


def _paired(low: float, high: float, hr_low: float = -0.01, hr_high: float = 0.01) -> dict[str, float]:
    """A REPLAY_VS_* entry: the MRR@20 difference's interval and the HR@20 difference's."""
    return {
        "mean": (low + high) / 2, "low": low, "high": high, "sessions": 40.0,
        "hr_mean": (hr_low + hr_high) / 2, "hr_low": hr_low, "hr_high": hr_high,
    }  # fmt: skip


def _replayed(full: float, own: float, versus_own: dict[str, float], **current: Any) -> dict[str, dict[str, float]]:
    """A candidate's replay metrics: full and batch+speed MRR@20 (HR@20 twice that), optionally the
    serving version's (current_full=, versus_current=)."""
    metrics = {
        REPLAY_FULL: {"mrr_at_20": full, "hr_at_20": 2 * full},
        REPLAY_OWN: {"mrr_at_20": own, "hr_at_20": 2 * own},
        REPLAY_VS_OWN: versus_own,
    }
    if current:
        metrics[REPLAY_CURRENT] = {"mrr_at_20": current["current_full"], "hr_at_20": 2 * current["current_full"]}
        metrics[REPLAY_VS_CURRENT] = current["versus_current"]
    return metrics


def test_gate_refuses_full_lists_worse_than_their_own_batch_speed() -> None:
    """Surely worse (the whole 95 % interval below 0) on MRR@20 or on HR@20: refused, even as the first version."""
    refused = decide(_replayed(0.20, 0.30, _paired(-0.14, -0.06)), None, None, 0.02)
    assert not refused.publish and "worse than its own batch+speed" in refused.reason
    fewer_hits = decide(_replayed(0.31, 0.30, _paired(-0.01, 0.03, hr_low=-0.08, hr_high=-0.01)), None, None, 0.02)
    assert not fewer_hits.publish and "worse than its own batch+speed" in fewer_hits.reason
    # Within noise (the intervals hold 0), the first version is published.
    first = decide(_replayed(0.29, 0.30, _paired(-0.04, 0.02)), None, None, 0.02)
    assert first.publish and first.reason.startswith("published: first version")
    # No replay measured (only the offline figures): never published.
    offline = {"als_ranker": {"mrr_at_20": 0.3}, "heuristic": {"mrr_at_20": 0.2}, PAIRED: _paired(0.05, 0.15)}
    assert not decide(offline, None, None, 0.02).publish


def test_the_offline_comparison_no_longer_decides() -> None:
    """A ranker worse than its pool offline is published when its served lists are not worse."""
    metrics = {**_replayed(0.30, 0.28, _paired(-0.01, 0.05)), PAIRED: _paired(-0.09, -0.02)}
    assert decide(metrics, None, None, 0.02).publish


def test_a_ranker_is_left_unused_only_when_it_surely_loses_to_its_pool() -> None:
    """Offline, ranker minus the pool's heuristic order: unused when the MRR@20 or the HR@20 interval lies
    wholly below 0; a ranker not shown to win (the interval holds 0) still ranks."""
    assert ranker_loss(_paired(0.01, 0.05)) is None
    assert ranker_loss(_paired(-0.03, 0.01, hr_low=-0.02, hr_high=0.0)) is None
    worse = ranker_loss(_paired(-0.05, -0.01))
    assert worse and "mrr_at_20 difference -0.0300 (95% -0.0500..-0.0100)" in worse
    assert ranker_loss(_paired(-0.01, 0.02, hr_low=-0.04, hr_high=-0.005))
    # An entry recorded before the hits were paired (MRR only) is judged on MRR alone.
    assert ranker_loss({"mean": 0.0, "low": -0.01, "high": 0.01, "sessions": 9.0}) is None


def test_offline_pairs_are_whole_sessions_of_reciprocal_ranks() -> None:
    """paired_reciprocal on reciprocal ranks is paired_ranks on the ranks they come from (0: missed)."""
    ranks_a, ranks_b = [1, None, 3, 2, None, 5], [2, 4, None, 1, None, 10]
    sessions = ["s1", "s1", "s2", "s3", "s3", "s4"]
    as_reciprocal = paired_reciprocal(
        [1 / r if r else 0.0 for r in ranks_a], [1 / r if r else 0.0 for r in ranks_b], sessions, seed=3
    )
    assert as_reciprocal == paired_ranks(ranks_a, ranks_b, sessions, seed=3)
    assert as_reciprocal["hr_mean"] == (4 - 4) / 6 and as_reciprocal["sessions"] == 4


def test_gate_compares_with_the_serving_version_on_the_same_targets() -> None:
    """Refused only when the paired interval's upper end is below -tolerance x the serving version's figure
    (0.02 x 0.40 = 0.008 of MRR@20, 0.016 of HR@20)."""
    def verdict(versus_current: dict[str, float]) -> Any:
        metrics = _replayed(0.39, 0.30, _paired(0.05, 0.13), current_full=0.40, versus_current=versus_current)
        return decide(metrics, {REPLAY_FULL: {"mrr_at_20": 0.9}}, "v1", 0.02, replayed="v1")

    within = verdict(_paired(-0.03, -0.005))  # surely a little worse, within the tolerance
    assert within.publish and "v1's full" in within.reason and "tolerance 2%" in within.reason
    worse = verdict(_paired(-0.03, -0.009))
    assert not worse.publish and worse.reason.startswith("rejected: replay full vs v1's full")
    fewer_hits = verdict(_paired(-0.01, 0.01, hr_low=-0.05, hr_high=-0.017))
    assert not fewer_hits.publish


def test_gate_falls_back_to_the_serving_versions_recorded_figure_when_it_was_not_replayed() -> None:
    """Trained on the window (or current only since the replay): compared with its own recorded replay
    MRR@20 under the tolerance, and the decision says so; with no recorded figure, not compared."""
    candidate = _replayed(0.38, 0.30, _paired(0.02, 0.10))
    recorded = {REPLAY_FULL: {"mrr_at_20": 0.40}}
    worse = decide(candidate, recorded, "v1", 0.02, replayed=None)
    assert not worse.publish and "v1 was not replayed on the window" in worse.reason and "-5.0%" in worse.reason
    assert decide(_replayed(0.395, 0.30, _paired(0.02, 0.10)), recorded, "v1", 0.02, replayed=None).publish
    # The paired figures against another version do not count for this one.
    other = _replayed(0.38, 0.30, _paired(0.02, 0.10), current_full=0.30, versus_current=_paired(0.05, 0.10))
    assert not decide(other, recorded, "v1", 0.02, replayed="v0").publish
    unmeasured = decide(candidate, {"als_ranker": {"mrr_at_20": 0.5}}, "v1", 0.02, replayed=None)
    assert unmeasured.publish and "not compared" in unmeasured.reason


def test_paired_ranks_pairs_reciprocal_ranks_and_hits() -> None:
    sessions = [f"s{i // 2}" for i in range(8)]
    better: list[int | None] = [1, 2, 1, None, 1, 1, 4, 2]
    worse: list[int | None] = [2, None, 1, None, 3, None, 4, 5]
    paired = paired_ranks(better, worse, sessions, seed=1)
    assert paired["mean"] == pytest.approx(np.mean([0.5, 0.5, 0, 0, 2 / 3, 1, 0, 0.3]))
    assert paired["hr_mean"] == pytest.approx(2 / 8) and paired["sessions"] == 4
    assert paired["low"] > 0 and paired["hr_low"] >= 0


def test_paired_bootstrap_resamples_sessions() -> None:
    sessions = [f"s{i // 4}" for i in range(200)]  # 50 sessions of 4 requests
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 200)
    better = paired_bootstrap(base + 0.1, base, sessions, seed=1)
    assert better["low"] > 0 and better["mean"] == pytest.approx(0.1) and better["sessions"] == 50
    noise = paired_bootstrap(base + rng.normal(0, 0.3, 200), base, sessions, seed=1)
    assert noise["low"] < 0 < noise["high"]


def test_partitions_are_days(lake: Lake) -> None:
    daily_events(lake, days=2, per_day=3)
    assert lake.partitions(EVENTS_DATASET) == [date(2026, 3, 8), date(2026, 3, 9)]
