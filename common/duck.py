"""DuckDB connections, configured once for every layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb


def connect(database: str = ":memory:", read_only: bool = False) -> duckdb.DuckDBPyConnection:
    import duckdb  # deferred: the CLI imports its commands' modules at start-up

    con = duckdb.connect(database, read_only=read_only)
    # DuckDB draws a progress bar on stdout for queries over ~2 s, which corrupts `--json` output and logs.
    con.execute("SET enable_progress_bar = false")
    return con
