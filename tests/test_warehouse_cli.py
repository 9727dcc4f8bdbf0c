"""The analyst side of the warehouse: `recs warehouse build/sql/shell/report`, the read-only guard."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from common.lake import Lake
from common.settings import get_settings, load_settings
from tests.test_warehouse import EVENTS, make_events, make_impressions, make_lake, make_registry
from warehouse.build import refresh_warehouse
from warehouse.cli import register
from warehouse.query import open_read_only, repl

CHART_IDS = ("chart-kpis", "chart-funnel", "chart-ctr", "chart-models", "chart-top-items")


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    var = tmp_path_factory.mktemp("var")
    make_lake(var / "lake")
    make_registry(var / "models")
    return var


@pytest.fixture
def settings_env(var_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Settings pointed at the hand-made lake; returns the var dir."""
    monkeypatch.setenv("RECS_VAR_DIR", str(var_dir))
    monkeypatch.setenv("RECS_LAKE__ROOT", str(var_dir / "lake"))
    monkeypatch.setenv("RECS_MODELS__ROOT", str(var_dir / "models"))
    get_settings.cache_clear()
    yield var_dir
    get_settings.cache_clear()


@pytest.fixture
def recs() -> typer.Typer:
    """A `recs` app with the warehouse commands mounted exactly as recs/main.py mounts them."""
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keeps `warehouse` a sub-command even when it is the only group
        pass

    return app


def invoke(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_build_then_query_as_table_csv_and_json(recs: typer.Typer, settings_env: Path) -> None:
    code, out, _ = invoke(recs, "warehouse", "build")
    assert code == 0, out
    assert (settings_env / "warehouse.duckdb").exists()

    code, out, _ = invoke(
        recs, "warehouse", "sql", "SELECT day, sessions, revenue FROM daily_kpis ORDER BY day"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["day", "sessions", "revenue"]
    assert lines[3].split() == ["2024-03-04", "3", "27.5"]
    assert lines[-1] == "(4 rows)"

    code, out, _ = invoke(recs, "warehouse", "sql", "SELECT variant, lists FROM experiment_results", "--json")
    assert code == 0
    assert json.loads(out) == [{"variant": "popular", "lists": 3}, {"variant": "ranker", "lists": 4}]

    code, out, _ = invoke(
        recs, "warehouse", "sql", "SELECT item_id, views FROM item_stats ORDER BY 1", "--csv"
    )
    assert code == 0
    assert list(csv.reader(io.StringIO(out)))[:2] == [["item_id", "views"], ["i1", "3"]]


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE stolen AS SELECT * FROM events",
        "DROP VIEW events",
        "INSERT INTO warehouse_info SELECT * FROM warehouse_info",
        "COPY (SELECT 1 AS x) TO '{lake}/events/dt=2024-03-09/part-evil.parquet' (FORMAT parquet)",
        "ATTACH '{lake}/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 1",
        "SELECT 1; DROP VIEW events",
    ],
)
def test_write_statements_are_refused_with_a_clear_message(
    recs: typer.Typer, settings_env: Path, statement: str
) -> None:
    lake = settings_env / "lake"
    before = sorted(p.relative_to(lake) for p in lake.rglob("*"))
    code, _, err = invoke(recs, "warehouse", "sql", statement.format(lake=lake))
    assert code == 2
    assert "refused: the warehouse is read-only for analysts" in err
    assert "Only SELECT queries run here" in err
    assert sorted(p.relative_to(lake) for p in lake.rglob("*")) == before
    code, out, _ = invoke(recs, "warehouse", "sql", "SELECT count(*) AS n FROM events", "--json")
    assert json.loads(out) == [{"n": len(EVENTS)}]


def test_a_bad_query_says_why(recs: typer.Typer, settings_env: Path) -> None:
    code, _, err = invoke(recs, "warehouse", "sql", "SELECT nope FROM daily_kpis")
    assert code == 1
    assert "query failed" in err and "nope" in err


def test_shell_runs_selects_and_refuses_writes(settings_env: Path) -> None:
    refresh_warehouse(load_settings())
    script = iter([".tables", "SELECT count(*) AS n", "FROM sessions;", "DROP VIEW sessions;", ".quit"])
    printed: list[str] = []
    with open_read_only(settings_env / "warehouse.duckdb") as con:
        repl(con, read=lambda _prompt: next(script), write=printed.append)
    output = "\n".join(printed)
    assert "daily_kpis" in output and "experiment_results" in output
    assert "n\n-\n8\n(1 row)" in output
    assert "error: refused: the warehouse is read-only" in output


def test_refresh_warehouse_writes_the_default_path(settings_env: Path) -> None:
    path = refresh_warehouse(load_settings())
    assert path == settings_env / "warehouse.duckdb"
    assert not list(settings_env.glob(".warehouse.duckdb.*"))  # the staging file was swapped in


def test_report_has_every_chart_and_works_offline(
    recs: typer.Typer, settings_env: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.html"
    code, stdout, _ = invoke(recs, "warehouse", "report", "--out", str(out))
    assert code == 0, stdout
    page = out.read_text()
    for chart_id in CHART_IDS:
        assert f'id="{chart_id}"' in page, chart_id
    assert page.count("Plotly.newPlot(") == len(CHART_IDS)
    assert "<script src=" not in page  # nothing fetched from the network
    assert page.count("plotly.js v") >= 1  # the library itself is inline, once
    assert "<th>Revenue</th><td>42.50</td>" in page
    assert "ndcg_at_20" in page and "ranker" in page and "Socks" in page


def test_report_on_an_empty_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recs: typer.Typer) -> None:
    monkeypatch.setenv("RECS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("RECS_LAKE__ROOT", str(tmp_path / "var" / "lake"))
    monkeypatch.setenv("RECS_MODELS__ROOT", str(tmp_path / "var" / "models"))
    get_settings.cache_clear()
    try:
        code, _, err = invoke(recs, "warehouse", "report", "--out", str(tmp_path / "r.html"))
    finally:
        get_settings.cache_clear()
    assert code == 0
    assert "building it" in err  # no warehouse yet: the command builds one
    page = (tmp_path / "r.html").read_text()
    assert all(f'id="{chart_id}"' in page for chart_id in CHART_IDS)
    assert "No events yet" in page and "No model versions yet" in page


def test_query_notes_sources_that_gained_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recs: typer.Typer
) -> None:
    var = tmp_path / "var"
    monkeypatch.setenv("RECS_VAR_DIR", str(var))
    monkeypatch.setenv("RECS_LAKE__ROOT", str(var / "lake"))
    monkeypatch.setenv("RECS_MODELS__ROOT", str(var / "models"))
    get_settings.cache_clear()
    try:
        lake = Lake(str(var / "lake"))
        lake.write_events(make_events())
        assert invoke(recs, "warehouse", "build")[0] == 0
        lake.write_impressions(make_impressions())
        code, out, err = invoke(recs, "warehouse", "sql", "SELECT count(*) AS n FROM impressions", "--json")
        assert json.loads(out) == [{"n": 0}]
        assert "lake_impressions had no files at build time" in err
        assert invoke(recs, "warehouse", "build")[0] == 0
        code, out, err = invoke(recs, "warehouse", "sql", "SELECT count(*) AS n FROM impressions", "--json")
        assert json.loads(out) == [{"n": 7}] and err == ""
    finally:
        get_settings.cache_clear()
