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


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
    app.command("generate")(generate)
