"""`recs evaluate replay`: the protocol's filters, the metrics, the batching rule, and whole replays on a
tiny synthetic shop (real training, a real redis-server, the speed consumer and the serving code)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from common.events import Event
from common.lake import Lake
from common.settings import PROJECT_ROOT, Settings, TrainingSettings, load_settings
from evaluation.metrics import Scoreboard, hit_rate, mean_reciprocal_rank, popularity_percentiles, rank_of
from evaluation.protocol import PROTOCOL_COLUMNS, Protocol, select_targets
from evaluation.replay import WEEK_S, ReplayConfig, chunk_bounds, run_replay, time_offset
from evaluation.strategies import without_business_rules
from serving.core.rules import load_rules

# ---------------------------------------------------------------- the protocol on a hand-built log

CUTOFF = 100.0
TRAIN_ITEMS = {"A", "B", "C", "D", "E", "R"}  # what the model was trained on (N is new in the window)


def event_log() -> pd.DataFrame:
    """Sessions s* before the cutoff, t* after it (events 1 s apart); item:type, type view by default."""
    sessions = {
        "s1": "A B C D E", "s2": "A B C D E", "s3": "A B C E", "s4": "A B D", "s5": "R A",
        "s6": "E",  # E's 5th event, alone in its session: E falls to 4 (rare) once one-event sessions go
        "t1": "A B R E C:add_to_cart C:purchase B:remove_from_cart",
        "t2": "A", "t3": "A N", "t4": "N N N N",
    }  # fmt: skip
    return session_frame(sessions, [(None, "B", "view", CUTOFF + 6)])  # no session: never scored


def session_frame(sessions: dict[str, str], extra: list[tuple[str | None, str, str, float]]) -> pd.DataFrame:
    """Protocol events of `sessions` (s* start before CUTOFF, others after it, events 1 s apart;
    tokens item[:type]), plus x1 straddling the cutoff and the `extra` rows, in replay order."""
    rows: list[tuple[str | None, str, str, float]] = []
    for n, (session, tokens) in enumerate(sessions.items()):
        start = (0.0 if session.startswith("s") else CUTOFF) + 10 * n
        for j, token in enumerate(tokens.split()):
            item, _, event_type = token.partition(":")
            rows.append((session, item, event_type or "view", start + j))
    rows += [("x1", "A", "view", CUTOFF - 5), ("x1", "B", "view", CUTOFF + 5), *extra]
    frame = pd.DataFrame(rows, columns=["session_id", "item_id", "event_type", "t"])
    frame["event_id"] = [f"e{i}" for i in range(len(frame))]
    return frame.sort_values("t", kind="stable")[PROTOCOL_COLUMNS].reset_index(drop=True)


def test_protocol_scores_only_first_occurrences_of_known_frequent_items_in_test_sessions() -> None:
    test = select_targets(event_log(), CUTOFF, TRAIN_ITEMS)

    targets = test.targets
    # t1 = A B R E C(cart) C(buy): A opens it, R is rare (2 events), E is rare once the one-event
    # session s6 is gone, the bought C repeats the carted one. t3 loses N (not in training) and is
    # then one event long; t2 is one event; t4 only N; the straddling x1 started before the cutoff.
    assert list(zip(targets["session_id"], targets["item_id"], targets["purchased"], strict=True)) == [
        ("t1", "B", False),
        ("t1", "C", True),
    ]
    assert test.counts["test_sessions"] == 3  # t1, t3, t4 (t2 went with the one-event sessions)
    assert test.counts["test_sessions_scored"] == 1
    assert test.counts["repeats"] == 1
    assert test.counts["purchase_targets"] == 1


def test_protocol_without_the_length_filter_would_keep_the_rare_item() -> None:
    """The one-event session s6 is what makes E rare: the filters run in GRU4Rec's order."""
    test = select_targets(event_log(), CUTOFF, TRAIN_ITEMS, Protocol(min_session_events=1))
    assert "E" in set(test.targets["item_id"])


def test_protocol_with_repeats_also_scores_the_purchase_of_the_carted_item() -> None:
    test = select_targets(event_log(), CUTOFF, TRAIN_ITEMS, Protocol(repeats=True))
    assert list(test.targets["item_id"]) == ["B", "C", "C"]


# ---------------------------------------------------------------- metrics, by hand


def test_hit_rate_and_mrr_by_hand() -> None:
    assert rank_of("b", ["a", "b", "c"], 20) == 2
    assert rank_of("c", ["a", "b", "c"], 2) is None  # beyond k
    ranks = [1, None, 4, 2]
    assert hit_rate(ranks) == 0.75
    assert mean_reciprocal_rank(ranks) == pytest.approx((1 + 0 + 0.25 + 0.5) / 4)


def test_popularity_percentiles_share_ties() -> None:
    assert popularity_percentiles({"a": 1, "b": 2, "c": 2, "d": 10}) == {
        "a": 0.0,
        "b": 0.5,
        "c": 0.5,
        "d": 1.0,
    }


def test_scoreboard_summary_by_hand() -> None:
    board = Scoreboard(k=20, catalog_size=10, percentile={"a": 0.0, "b": 0.5, "c": 0.5})
    board.add(["a", "b"], "b", purchased=True)
    board.add(["a", "c"], "x", purchased=False, new_item=True)
    summary = board.summary()
    assert (summary["new_item_hr_at_20"], summary["new_item_predictions"]) == (0.0, 1)
    assert (summary["hr_at_20"], summary["mrr_at_20"], summary["purchase_hr_at_20"]) == (0.5, 0.25, 1.0)
    assert summary["coverage"] == 0.3  # a, b, c of 10
    board.add(["a", "b", "c", "n"], "n", purchased=False, new_item=True)  # a new item found 4th
    summary = board.summary()
    assert (summary["new_item_hr_at_20"], summary["new_item_mrr_at_20"]) == (0.5, 0.125)
    assert summary["popularity_percentile"] == 0.25  # (0 + .5 + 0 + .5) / 4 slots


# ---------------------------------------------------------------- batching and the clock

T0 = datetime(2026, 10, 1, tzinfo=UTC)


def event(seconds: float, session: str, person: str) -> Event:
    at = T0 + timedelta(seconds=seconds)
    return Event(
        event_id=str(uuid.uuid4()), event_type="view", ts=at, received_at=at, anonymous_id=person,
        session_id=session, item_id="i",
    )  # fmt: skip


def test_a_list_sees_every_earlier_event_of_its_session_and_person() -> None:
    events = [
        event(0, "s1", "p1"),
        event(1, "s2", "p2"),
        event(2, "s1", "p1"),  # scored, s1 already in the batch: a new batch starts here
        event(3, "s3", "p3"),  # scored, nothing of p3 yet: same batch
        event(4, "s2", "p2"),
        event(5, "s4", "p2"),  # scored, another session but the same person as the event before
        event(200, "s5", "p5"),  # more than the span after the batch's first event
    ]
    scored = {events[i].event_id for i in (2, 3, 5)}
    assert list(chunk_bounds(events, scored, span_s=60, max_events=500)) == [(0, 2), (2, 5), (5, 6), (6, 7)]
    assert list(chunk_bounds(events, scored, span_s=60, max_events=2)) == [
        (0, 2),
        (2, 4),
        (4, 5),
        (5, 6),
        (6, 7),
    ]


def test_time_offset_is_whole_weeks_into_the_future() -> None:
    now = time.time()
    first = datetime(2011, 11, 25, tzinfo=UTC).timestamp()
    offset = time_offset(first, now)
    assert offset % WEEK_S == 0
    assert now + 3600 <= first + offset < now + 3600 + WEEK_S


def test_plain_rules_have_no_business_rules() -> None:
    production = load_rules(PROJECT_ROOT / "serving" / "rules.yaml")
    plain = without_business_rules(production)
    assert plain.diversity.cap(20) == 20
    assert not (plain.exclude.in_cart or plain.exclude.out_of_stock or plain.exclude.purchased_within_days)
    assert plain.new_arrivals.reserved_slots == 0 and plain.boost.promoted == 0


# ---------------------------------------------------------------- whole replays (real Redis, real training)

TEST_DAYS, WARMUP_DAYS = 3, 2
SCORED = ("hr_at_20", "mrr_at_20", "purchase_hr_at_20", "coverage", "popularity_percentile", "predictions")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recs.generate import generate

    root = tmp_path_factory.mktemp("replay-shop") / "lake"
    generate("tiny", 11, Lake(str(root)), end_date=datetime(2026, 11, 1).date())
    return root


def replay_settings(**api: Any) -> Settings:
    base = load_settings(training=TrainingSettings(factors=32, iterations=10))
    return base.model_copy(update={"api": base.api.model_copy(update=api)}) if api else base


def scores(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {k: row[k] for k in SCORED} for name, row in report["strategies"].items()}


@pytest.fixture(scope="module")
def replayed(shop: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    work = tmp_path_factory.mktemp("replay-work")
    config = ReplayConfig(lake=str(shop), test_days=TEST_DAYS, warmup_days=WARMUP_DAYS, seed=3)
    return run_replay(config, replay_settings(), work), work


def test_the_report_has_every_strategy_and_field(replayed: tuple[dict[str, Any], Path]) -> None:
    report, _ = replayed
    assert list(report["strategies"]) == ["popular", "batch", "batch+speed", "full", "sknn", "sr"]
    for name, row in report["strategies"].items():
        assert set(SCORED) <= set(row)
        assert row["predictions"] == report["predictions"] > 100
        assert row["degraded"] == 0  # every list came from the full serving path
        assert row["mean_list_length"] == 20 or name in report["reference_strategies"]
    # the reference algorithms (not served) are scored on the same targets as the product
    assert report["strategies"]["sknn"]["predictions"] == report["strategies"]["sr"]["predictions"] == (
        report["strategies"]["full"]["predictions"]
    )
    assert report["events_replayed"] > 500 and report["warmup_events"] > 0
    assert report["predictions_per_s"] > 0 and report["wall_s"] >= report["replay_s"]
    assert report["cutoff"].startswith("2026-10-29") and report["window_end"].startswith("2026-11-01")


def test_items_new_in_the_window_are_targets_counted_apart(replayed: tuple[dict[str, Any], Path]) -> None:
    """The tiny shop creates items inside the window: their events are targets, and each strategy reports
    its hit rate on them; serving met them through the catalog as they were created."""
    report, _ = replayed
    new = report["protocol"]["new_item_targets"]
    assert 0 < new < report["predictions"] and report["content_vectors"] is True
    for row in report["strategies"].values():
        assert row["new_item_predictions"] == new and 0 <= row["new_item_hr_at_20"] <= 1
    assert report["strategies"]["batch+speed"]["new_item_hr_at_20"] > 0


def test_the_speed_layer_adds_to_the_batch_model_on_planted_sessions(
    replayed: tuple[dict[str, Any], Path],
) -> None:
    """The synthetic shop's sessions stay in a category and co-visit related items: only the speed
    layer (session co-visitation, fold-in, deltas) sees the session, so it must lift HR@20 a lot."""
    hr = {name: row["hr_at_20"] for name, row in replayed[0]["strategies"].items()}
    assert hr["batch+speed"] >= 1.3 * hr["batch"], hr
    assert hr["batch"] > hr["popular"], hr


def test_same_seed_same_scores_whatever_the_process_split(
    shop: Path, replayed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """A second run, trained from scratch and replayed by two processes, scores exactly the same."""
    config = ReplayConfig(lake=str(shop), test_days=TEST_DAYS, warmup_days=WARMUP_DAYS, seed=3, workers=2)
    again = run_replay(config, replay_settings(), tmp_path / "work")
    assert again["workers"] == 2
    assert scores(again) == scores(replayed[0])


@pytest.mark.slow  # ~30-60 s: 9 redis-server processes and the split path's round trips
def test_a_replay_on_a_redis_cluster_scores_exactly_as_on_one_redis(shop: Path, tmp_path: Path) -> None:
    """The same window replayed with the speed layer and serving on a Redis Cluster of 3 masters and 3
    replicas (the split write path, the per-node reads) serves the same lists as on one redis-server:
    every served strategy's scores are equal (the reference algorithms read no Redis). The shop's identify
    events take the cluster's stepwise merge."""
    served = ("popular", "batch", "batch+speed", "full")
    config = ReplayConfig(
        lake=str(shop), test_days=TEST_DAYS, warmup_days=WARMUP_DAYS, seed=3, strategies=served
    )
    single = run_replay(config, replay_settings(), tmp_path / "work")
    on_cluster = run_replay(replace(config, redis_cluster=True), replay_settings(), tmp_path / "work")  # same model
    assert (on_cluster["redis_masters"], single["redis_masters"]) == (3, 1)
    assert on_cluster["model_version"] == single["model_version"]
    assert on_cluster["events_replayed"] == single["events_replayed"] > 500
    assert list(scores(on_cluster)) == list(served)
    assert scores(on_cluster) == scores(single)
    assert on_cluster["strategies"]["batch+speed"]["hr_at_20"] > on_cluster["strategies"]["batch"]["hr_at_20"]


def test_the_replay_runs_the_production_rules(
    shop: Path, replayed: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    """Tightening the category cap in the rules file changes `full` (the only strategy with business rules)."""
    production = PROJECT_ROOT / "serving" / "rules.yaml"
    rules = yaml.safe_load(production.read_text())
    rules["diversity"]["max_share_per_category"] = 0.05  # one place per category in a list of 20
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    assert load_rules(rules_file).diversity.cap(20) == 1 < load_rules(production).diversity.cap(20)
    config = ReplayConfig(
        lake=str(shop),
        test_days=TEST_DAYS,
        warmup_days=WARMUP_DAYS,
        seed=3,
        strategies=("batch+speed", "full"),
    )
    report, work = replayed
    uncapped = scores(run_replay(config, replay_settings(rules_file=rules_file), work))  # reuses the model
    before = scores(report)
    assert uncapped["batch+speed"] == before["batch+speed"]
    assert uncapped["full"] != before["full"]


def test_cli_prints_json_and_the_table_formats_a_report(
    replayed: tuple[dict[str, Any], Path], shop: Path
) -> None:
    import typer

    from evaluation.cli import format_table, register

    app = typer.Typer()
    register(app)
    report, work = replayed
    args = ["evaluate", "replay", "--lake", str(shop), "--test-days", str(TEST_DAYS), "--warmup-days", "2",
            "--strategies", "batch", "--seed", "3", "--workers", "1", "--work-dir", str(work), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{") :])
    assert list(printed["strategies"]) == ["batch"]
    assert {"strategies", "predictions", "wall_s"} <= set(printed)
    table = format_table(report)
    assert "HR@20" in table and all(f"\n{name} " in table for name in report["strategies"])
    bad = CliRunner().invoke(app, ["evaluate", "replay", "--lake", str(shop), "--strategies", "nope"])
    assert bad.exit_code != 0


def test_the_bandit_strategy_learns_from_simulated_clicks_and_reports_its_regret(
    shop: Path, replayed: tuple[dict[str, Any], Path]
) -> None:
    """`bandit` shows one of full, batch+speed and popular at each moment (Thompson sampling, common/bandit.py);
    its process serves all three, so every arm's hits over the same moments give its regret."""
    report, work = replayed
    config = ReplayConfig(
        lake=str(shop), test_days=TEST_DAYS, warmup_days=WARMUP_DAYS, seed=3, strategies=("popular", "bandit")
    )
    again = run_replay(config, replay_settings(), work)  # reuses the model
    row = again["strategies"]["bandit"]
    predictions = again["predictions"]
    assert row["predictions"] == predictions == report["predictions"]
    fixed = {arm: facts["fixed_hits"] for arm, facts in row["arms"].items()}
    for arm in ("full", "batch+speed", "popular"):  # each arm's lists are those the fixed strategy served
        assert fixed[arm] == round(report["strategies"][arm]["hr_at_20"] * predictions), arm
    assert row["best_fixed_arm"] == max(fixed, key=fixed.__getitem__)
    assert row["hits"] == round(row["hr_at_20"] * predictions)
    assert row["regret"] == fixed[row["best_fixed_arm"]] - row["hits"]
    assert row["regret_per_target"] == round(row["regret"] / predictions, 4)
    assert sum(arm["share"] for arm in row["arms"].values()) == pytest.approx(1.0, abs=1e-3)
    assert min(arm["share"] for arm in row["arms"].values()) >= 0.02  # the floor (0.05) keeps every arm shown
    assert row["arms"]["popular"]["share"] < 0.3  # the worst arm lost most of its traffic
    assert row["hits"] > fixed["popular"]
