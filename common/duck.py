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


# DuckDB lists a view's glob on every bind and every query; uncached, each listing is a round trip per
# directory (a warehouse build over a two-week lake on S3 took 28 s instead of 4). A query sees a
# file written since then at most this late.
LISTINGS_EXPIRY_S = 60


def register_store(con: duckdb.DuckDBPyConnection, root_url: str) -> None:
    """Let `con` read the files under `root_url` (s3://...) through fsspec, as the lake does.

    DuckDB's own S3 reader (the httpfs extension) is not in the duckdb wheel and is downloaded on first
    use, which a machine without internet cannot do; a registered fsspec filesystem serves its protocol
    to read_parquet, read_json and read_text instead. Local paths need nothing."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(root_url, listings_expiry_time=LISTINGS_EXPIRY_S)
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    # One filesystem serves every bucket of its protocol; DuckDB refuses to register a protocol twice.
    if "file" not in protocols and "local" not in protocols and protocols[0] not in con.list_filesystems():
        con.register_filesystem(fs)
