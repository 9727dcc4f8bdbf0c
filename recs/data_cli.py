"""Commands of this layer (filled in as the layer lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this layer's commands to `recs`."""
