"""`recs bench serve --lake`: the state built from a shop's own lake (bench/lake_state.py) on a tiny
generated shop: real training, a real redis-server, the real speed consumer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.compute as pc
import pytest

from bench.lake_state import build_lake_state, last_visitors, recent_events
from bench.serve import LiveState, RealLake
from common.lake import Lake
from common.registry import Registry
from common.speed_state import read_speed_state
from evaluation import replay

DAYS = 2


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recs.generate import generate

    root = tmp_path_factory.mktemp("bench-shop") / "lake"
    generate("tiny", 5, Lake(str(root)), end_date=datetime(2026, 11, 1).date())
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-models")


@pytest.fixture(scope="module")
def live(shop: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveState]:
    state = build_lake_state(tmp_path_factory.mktemp("bench-run"), str(shop), DAYS, 40, 200, models)
    yield state
    state.stop()


def queries(paths: list[str]) -> list[dict[str, str]]:
    return [{k: v[0] for k, v in parse_qs(urlsplit(path).query).items()} for path in paths]


def test_the_model_is_trained_on_the_days_before_the_folded_ones(live: LiveState, shop: Path, models: Path) -> None:
    lake = Lake(str(shop))
    start, end = replay.test_window(lake, DAYS)
    registry = Registry(str(models))
    manifest = registry.read_manifest(registry.current() or "")
    assert manifest.cutoff == start
    assert live.folded == replay.replay_events(lake, start, end).num_rows  # every event of the last days, once


def test_a_second_run_reuses_the_trained_version(live: LiveState, shop: Path, models: Path, tmp_path: Path) -> None:
    registry = Registry(str(models))
    version = registry.current() or ""
    written = registry.read_manifest(version).created_at
    again = build_lake_state(tmp_path, str(shop), DAYS, 10, 20, models)
    again.stop()
    assert registry.versions() == [version]
    assert registry.read_manifest(version).created_at == written


def test_the_events_are_moved_to_end_a_minute_ago_with_their_gaps_kept(shop: Path) -> None:
    lake = Lake(str(shop))
    original = replay.replay_events(lake, *replay.test_window(lake, DAYS))["received_at"]
    moved = recent_events(lake, DAYS)
    offset = moved[-1].received_at.timestamp() - pc.max(original).as_py().timestamp()
    assert datetime.now().timestamp() - moved[-1].received_at.timestamp() == pytest.approx(60, abs=30)
    assert moved[0].received_at.timestamp() - offset == pytest.approx(pc.min(original).as_py().timestamp())


def test_the_mix_asks_for_the_last_sessions_people_and_their_items(live: LiveState, shop: Path) -> None:
    lake = Lake(str(shop))
    visitors = last_visitors(recent_events(lake, DAYS), 40)
    asked = queries(live.paths)
    people = {v.user_id or v.anonymous_id for v in visitors}
    assert {q.get("user_id") or q["anonymous_id"] for q in asked} <= people
    assert any("session_id" in q for q in asked) and any(q.get("context") == "product" for q in asked)
    viewed = {item for v in visitors for item in v.items}
    assert {q["item_id"] for q in asked if "item_id" in q} <= viewed
    assert set(viewed) <= set(lake.read_catalog()["item_id"].to_pylist())


def test_every_session_of_the_mix_is_live_in_the_speed_state(live: LiveState, shop: Path) -> None:
    visitors = last_visitors(recent_events(Lake(str(shop)), DAYS), 40)
    assert len(visitors) == 40
    for visitor in visitors:
        person = visitor.user_id or visitor.anonymous_id
        state = read_speed_state(
            live.client, person, anonymous_id=visitor.anonymous_id, session_id=visitor.session_id
        )
        assert visitor.items[-1] in state.session_items
        assert set(state.session_items) <= set(visitor.items)


def test_the_in_process_bench_runs_the_lake_mix(shop: Path, models: Path) -> None:
    from bench.serve_profile import bench_in_process

    result: dict[str, Any] = bench_in_process(
        rounds=1, passes=1, profile=False, visitors=20, requests=40, real=RealLake(str(shop), DAYS, models)
    )
    assert result["state"] == f"lake {shop}, last {DAYS} days"
    assert result["requests"] == 40
    assert result["this"]["redis"]["by_command"].get("evalsha_ro", 0) >= 1  # the speed state was read


def test_the_speed_bench_drains_every_event_of_the_last_days_in_arrival_order(shop: Path, models: Path) -> None:
    from bench.speed import run_speed_bench_on_lake

    result = run_speed_bench_on_lake(RealLake(str(shop), DAYS, models), repeats=2)
    lake = Lake(str(shop))
    assert result["events"] == replay.replay_events(lake, *replay.test_window(lake, DAYS)).num_rows
    assert len(result["events_per_s_runs"]) == 2  # each repeat drained the whole stream (or it raises)
    assert 0 < result["throughput_events"] <= result["events"]
    assert result["redis_commands_per_event_by_name"]  # the effects ran: Redis saw their writes
    assert result["state"] == f"lake {shop}, last {DAYS} days"


def test_the_lake_mode_refuses_what_it_cannot_combine(shop: Path) -> None:
    from typer.testing import CliRunner

    from recs.main import app

    runner = CliRunner()
    refused = runner.invoke(app, ["bench", "speed", "--lake", str(shop), "--consumers", "2"])
    assert refused.exit_code == 2 and "--lake goes without --consumers" in refused.output
    refused = runner.invoke(app, ["bench", "serve", "--models", str(shop)])
    assert refused.exit_code == 2 and "--models goes with --lake" in refused.output
