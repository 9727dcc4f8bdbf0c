"""`recs warehouse ...`: build the DuckDB warehouse, query it read-only, open a shell, write the report."""

from __future__ import annotations

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


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.add_typer(warehouse_app, name="warehouse")
