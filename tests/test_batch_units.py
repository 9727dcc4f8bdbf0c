"""Batch layer without Spark or Airflow: the interactions rule, data quality, erasure, metrics, gate."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.events import Event, EventType, deterministic_event_id, events_to_table
from common.features import decay, implicit_weight
from common.lake import EVENTS_DATASET, Lake
from common.settings import TrainingSettings
from spark_jobs.erasure import apply_erasures
from spark_jobs.evaluate import mrr_at_k, ndcg_at_k, recall_at_k
from spark_jobs.gate import PAIRED, decide, paired_bootstrap
from spark_jobs.interactions import local_interactions
from spark_jobs.quality import DataQualityError, validate_events

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
        session_id=f"s-{anon}",
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
    assert apply_erasures(lake).rows_removed == 0  # nothing queued: nothing rewritten


# ---------------------------------------------------------------- metrics and gate


def test_ranking_metrics() -> None:
    ranked = ["x", "a", "y", "b"]
    assert recall_at_k(ranked, {"a", "b", "c", "d"}) == 0.5
    assert mrr_at_k(ranked, {"b"}) == 0.25
    assert ndcg_at_k(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    assert 0 < ndcg_at_k(ranked, {"a", "b"}) < 1


def _measured(mrr: float, heuristic: float, low: float, high: float) -> dict[str, dict[str, float]]:
    paired = {"mean": mrr - heuristic, "low": low, "high": high, "sessions": 40.0}
    return {"als_ranker": {"mrr_at_20": mrr}, "heuristic": {"mrr_at_20": heuristic}, PAIRED: paired}


def test_gate_publishes_within_tolerance_and_rejects_beyond() -> None:
    current = {"als_ranker": {"mrr_at_20": 0.40}}
    assert decide(_measured(0.10, 0.09, -0.01, 0.03), None, None, 0.02).publish
    assert decide(_measured(0.395, 0.30, 0.05, 0.14), current, "v1", 0.02).publish
    worse = decide(_measured(0.38, 0.30, 0.04, 0.12), current, "v1", 0.02)
    assert not worse.publish and "-5.0%" in worse.reason and "v1" in worse.reason


def test_gate_refuses_a_ranker_that_is_worse_than_its_own_candidates() -> None:
    """Clearly worse than the pool without the ranker (the whole interval below 0): refused, even as the first version."""
    refused = decide(_measured(0.20, 0.30, -0.14, -0.06), None, None, 0.02)
    assert not refused.publish and "worse than its candidates" in refused.reason
    # Within noise (the interval holds 0), it may publish.
    assert decide(_measured(0.29, 0.30, -0.04, 0.02), None, None, 0.02).publish
    # Nothing measured: never published.
    assert not decide({"als_ranker": {"mrr_at_20": 0.3}}, None, None, 0.02).publish


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
