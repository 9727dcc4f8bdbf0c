"""`recs demo --size tiny` end to end: trains through the real DAG, serves, streams, personalises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_demo(var: Path) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECS_")}
    env.update({"RECS_VAR_DIR": str(var), "RECS_REDIS__PORT": "0", "COLUMNS": "120"})
    done = subprocess.run(
        [sys.executable, "-m", "recs.main", "demo", "--size", "tiny", "--json"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:])), done.stdout


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str, dict, str]:
    var = tmp_path_factory.mktemp("demo") / "var"
    first, first_out = run_demo(var)
    second, second_out = run_demo(var)
    return var, first, first_out, second, second_out


def test_demo_trains_through_the_dag_and_publishes(demo_runs) -> None:
    var, first, first_out, _, _ = demo_runs
    assert "airflow dags test" in first_out
    version = first["model_version"]
    manifest = json.loads((var / "models" / version / "manifest.json").read_text())
    assert manifest["status"] == "published"
    assert (var / "models" / "CURRENT").read_text().strip() == version
    assert first["metrics"]["als_ranker"]["ndcg_at_20"] > first["metrics"]["popular"]["ndcg_at_20"]


def test_demo_serves_every_live_event_and_recommendations_follow_the_session(demo_runs) -> None:
    _, first, _, _, _ = demo_runs
    assert first["live_events_sent"] > 100
    assert first["live_events_accepted"] == first["live_events_sent"]
    assert first["degraded"] is None
    assert first["changed"], "recommendations did not change after the live events"
    assert first["browsed_category"] in first["after_categories"]
    assert first["freshness_ms"] is not None and first["freshness_ms"] < 10_000


def test_demo_lands_events_in_the_lake_and_writes_the_report(demo_runs) -> None:
    var, first, _, _, _ = demo_runs
    report = Path(first["report"])
    html = report.read_text()
    assert "Plotly.newPlot" in html
    # The lake writer landed the live day (received now) beside the history.
    import pyarrow.dataset as ds

    from common.lake import Lake

    lake = Lake(str(var / "lake"))
    today = max(lake.event_days())
    files = lake.partition_files(lake_dataset(), today)
    landed = ds.dataset(files, format="parquet").count_rows()
    assert landed >= first["live_events_sent"]


def lake_dataset():
    from common.lake import EVENTS_DATASET

    return EVENTS_DATASET


def test_second_run_reuses_model_and_data(demo_runs) -> None:
    _, first, _, second, second_out = demo_runs
    assert "reusing model" in second_out
    assert "generated" not in second_out
    assert second["model_version"] == first["model_version"]
    assert second["history_events"] == first["history_events"]
