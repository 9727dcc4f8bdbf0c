"""`recs warehouse ...`: build the DuckDB warehouse, query it read-only, open a shell, write the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from common import duck

if TYPE_CHECKING:
    import duckdb

    from common.settings import Settings

warehouse_app = typer.Typer(
    help="The DuckDB warehouse: analyst views over the lake, a read-only SQL prompt, an HTML report.",
    no_args_is_help=True,
)

DB_OPTION = typer.Option(None, "--db", help="Warehouse file (default: <var_dir>/warehouse.duckdb).")


def _settings() -> Settings:
    from common.settings import SettingsError, get_settings

    try:
        return get_settings()
    except SettingsError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


def _build(settings: Settings, db: Path | None) -> Path:
    from warehouse.build import build_warehouse, default_db_path

    return build_warehouse(
        db or default_db_path(settings),
        settings.lake.root,
        settings.models.root,
        control_variant=settings.experiments.control,
    )


def _connect(db: Path | None) -> duckdb.DuckDBPyConnection:
    """A read-only connection; builds the warehouse first if there is none yet."""
    from warehouse.build import default_db_path, sources_filled_since_build
    from warehouse.query import open_read_only

    settings = _settings()
    path = db or default_db_path(settings)
    if not path.exists():
        typer.echo(f"no warehouse at {path} yet; building it", err=True)
        _build(settings, path)
    con = open_read_only(path)
    filled = sources_filled_since_build(con)
    if filled:
        typer.secho(
            f"note: {', '.join(filled)} had no files at build time and have some now; "
            "run `recs warehouse build` to include them",
            fg="yellow",
            err=True,
        )
    return con


@warehouse_app.command("build")
def build(db: Path | None = DB_OPTION) -> None:
    """(Re)build the warehouse views over the lake and the model registry."""
    settings = _settings()
    path = _build(settings, db)
    with duck.connect(str(path), read_only=True) as con:
        (empty,) = con.execute("SELECT empty_sources FROM warehouse_info").fetchone() or ([],)
    typer.echo(f"warehouse built at {path} over lake {settings.lake.root} and models {settings.models.root}")
    if empty:
        typer.echo(f"no files yet for: {', '.join(empty)} (their views are empty until the next build)")


@warehouse_app.command("sql")
def sql(
    query: str = typer.Argument(..., help='A SELECT statement, e.g. "SELECT * FROM daily_kpis".'),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of objects."),
    max_rows: int = typer.Option(1000, min=1, help="Rows printed in table form."),
    db: Path | None = DB_OPTION,
) -> None:
    """Run a read-only query and print a table (or CSV / JSON). Anything but SELECT is refused."""
    import duckdb

    from warehouse.query import ReadOnlyError, print_result, run_query

    if as_csv and as_json:
        raise typer.BadParameter("choose one of --csv and --json")
    con = _connect(db)
    try:
        columns, rows = run_query(con, query)
    except ReadOnlyError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    except duckdb.Error as exc:
        typer.secho(f"query failed: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    finally:
        con.close()
    print_result(columns, rows, "csv" if as_csv else "json" if as_json else "table", max_rows)


@warehouse_app.command("shell")
def shell(db: Path | None = DB_OPTION) -> None:
    """An interactive read-only SQL prompt on the warehouse (the same guard as `sql`)."""
    from warehouse.query import repl

    try:
        import readline  # noqa: F401  (gives input() line editing and history)
    except ImportError:
        pass
    con = _connect(db)
    try:
        repl(con)
    finally:
        con.close()


@warehouse_app.command("report")
def report(
    out: Path = typer.Option(Path("report.html"), "--out", help="Where to write the HTML page."),
    db: Path | None = DB_OPTION,
) -> None:
    """Write one self-contained HTML page of charts (works offline: plotly.js is embedded)."""
    from warehouse.report import render_report

    con = _connect(db)
    try:
        html = render_report(con)
    finally:
        con.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    typer.echo(f"report written to {out} ({len(html) // 1024} KiB)")


drift_app = typer.Typer(
    help="Drift monitoring: serving's sampled feature rows, scores and categories against the training baseline.",
    no_args_is_help=True,
)


@drift_app.command("report")
def drift_report(
    since: str | None = typer.Option(
        None, "--since", help="Only samples served since: a duration back from now (30m, 24h, 7d) or an ISO time."
    ),
    out: Path = typer.Option(Path("."), "--out", help="Directory for drift.json and drift.html (beside report.html)."),
    version: str | None = typer.Option(None, "--version", help="Model version (default: the serving one)."),
) -> None:
    """Print PSI and KS per feature, the score, the category mix and the cold-start share; write JSON and HTML.
    A drift past drift.psi_threshold marks the version in the registry (models/<version>/DRIFTED)."""
    from common.registry import RegistryError
    from warehouse.drift import check, table_rows
    from warehouse.query import format_table

    settings = _settings()
    try:
        outcome = check(settings, out, _since(since), version)
    except (RegistryError, RuntimeError) as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    report = outcome.report
    typer.echo(format_table(["quantity", "PSI", "KS", "flag"], table_rows(report)))
    verdict = "DRIFT: " + "; ".join(report.reasons) if report.drifted else report.note or "no drift"
    typer.secho(f"{report.version}: {verdict}", fg="red" if report.drifted else None)
    if outcome.newly_marked:
        typer.echo(f"marked {report.version} drifted in the registry")
    typer.echo(f"written {outcome.json_path} and {outcome.html_path}")


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    units = {"m": 60, "h": 3600, "d": 86_400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither a duration (30m, 24h, 7d) nor an ISO time", param_hint="--since"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.add_typer(warehouse_app, name="warehouse")
    app.add_typer(drift_app, name="drift")
