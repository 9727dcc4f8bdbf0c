"""Data commands: `recs generate` (synthetic storefront) and `recs import` (real event exports)."""

from __future__ import annotations

from datetime import date
from typing import Annotated

import typer

from recs.system_cli import settings_or_exit


def _lake(out: str | None):  # type: ignore[no-untyped-def]
    """The lake at --out, or the configured one."""
    from common.lake import Lake

    return Lake(out or settings_or_exit().lake.root)


def generate(
    size: Annotated[str, typer.Option(help="tiny (~5k events, 14 days), small (~100k), medium (~1M), large (~10M).")] = "small",
    seed: Annotated[int, typer.Option(help="Same seed, size and end date give byte-identical files.")] = 42,
    out: Annotated[str | None, typer.Option(help="Lake root (path or fsspec URL); default: the configured lake.")] = None,
    end_date: Annotated[
        str | None, typer.Option(help="Last day (exclusive) of the history, YYYY-MM-DD; default 2026-11-01.")
    ] = None,
) -> None:
    """Generate a synthetic storefront (catalog and event history) into the lake."""
    from recs.generate import SIZES
    from recs.generate import generate as run

    if size not in SIZES:
        raise typer.BadParameter(f"{size!r} is not one of {', '.join(SIZES)}", param_hint="--size")
    try:
        end = date.fromisoformat(end_date) if end_date else None
    except ValueError:
        raise typer.BadParameter(f"{end_date!r} is not a date like 2026-11-01", param_hint="--end-date") from None
    lake = _lake(out)
    summary = run(size, seed, lake, end_date=end)
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"  lake: {lake.root_url}")


import_app = typer.Typer(help="Import real event history into the lake (ids are deterministic: re-importing dedups).")


def _print_report(report, lake) -> None:  # type: ignore[no-untyped-def]
    for line in report.lines():
        typer.echo(line)
    typer.echo(f"  lake: {lake.root_url}")


@import_app.command("online-retail")
def import_online_retail(
    file: Annotated[str, typer.Argument(help="online_retail.csv(.gz): the UCI Online Retail invoice lines.")],
    out: Annotated[str | None, typer.Option(help="Lake root; default: the configured lake.")] = None,
) -> None:
    """Import the UCI Online Retail file: invoices become cart-then-purchase sessions, cancellations returns."""
    from recs.importers import import_online_retail as run

    lake = _lake(out)
    try:
        report = run(file, lake)
    except (OSError, ValueError) as exc:
        typer.secho(f"cannot import {file}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    _print_report(report, lake)


@import_app.command("csv")
def import_csv(
    file: Annotated[str, typer.Argument(help="A CSV (or .csv.gz) event export, one event a row.")],
    map_: Annotated[
        str,
        typer.Option(
            "--map",
            help="FIELD=COLUMN pairs: ts, item and one of user, anonymous, session required; type, price, quantity, "
            "query, offset_ms (milliseconds added to ts), category, brand, title optional (any of the last three: a "
            "catalog of the items seen is written too). With --no-header, COLUMN is a position counted from 1.",
        ),
    ],
    sep: Annotated[str, typer.Option(help="Field separator.")] = ",",
    ts_unit: Annotated[str, typer.Option(help="s or ms (epoch numbers), iso (ISO 8601) or a strftime pattern such as '%d/%m/%Y %H:%M'; no zone means UTC.")] = "iso",
    type_map: Annotated[
        str | None, typer.Option(help="EVENT_TYPE=VALUE[|VALUE] pairs, e.g. view=pageview|detail,purchase=order.")
    ] = None,
    default_type: Annotated[str, typer.Option(help="Event type of rows with no type column or an empty one.")] = "view",
    no_header: Annotated[bool, typer.Option("--no-header", help="The file has no header row.")] = False,
    out: Annotated[str | None, typer.Option(help="Lake root; default: the configured lake.")] = None,
) -> None:
    """Import a store's own event export; sessions split on a 30-minute gap when no session column is mapped."""
    from recs.importers import CsvFormat, parse_mapping, parse_type_map
    from recs.importers import import_csv as run

    try:
        fmt = CsvFormat(
            mapping=parse_mapping(map_), sep=sep, ts_unit=ts_unit, type_map=parse_type_map(type_map),
            default_type=default_type, header=not no_header,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    lake = _lake(out)
    try:
        report = run(file, lake, fmt)
    except (OSError, ValueError) as exc:
        typer.secho(f"cannot import {file}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    _print_report(report, lake)


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.command("generate")(generate)
    app.add_typer(import_app, name="import")
