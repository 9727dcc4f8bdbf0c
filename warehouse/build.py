"""Builds the DuckDB warehouse: source views over the lake's Parquet and the registry's manifests,
then the analyst views in warehouse/sql/*.sql, applied in file-name order.

Nothing is copied: every view reads the files when queried, so new partitions and new model
versions show without a rebuild. A dataset with no files yet (a fresh lake has no impressions)
gets an empty view of the contract's schema instead; `recs warehouse build` (run nightly by the
DAG's last task) swaps in the live view once files exist.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa

from common import duck
from common.catalog import CATALOG_SCHEMA
from common.events import EVENT_SCHEMA
from common.lake import CATALOG, EVENTS, IMPRESSION_SCHEMA, IMPRESSIONS
from common.settings import Settings

WAREHOUSE_FILE = "warehouse.duckdb"
SQL_DIR = Path(__file__).resolve().parent / "sql"

# Column types of a manifest.json (common.registry.Manifest); metrics is strategy -> metric -> value.
MANIFEST_COLUMNS = {
    "version": "VARCHAR",
    "created_at": "TIMESTAMPTZ",
    "cutoff": "TIMESTAMPTZ",
    "engine": "VARCHAR",
    "parameters": "JSON",
    "metrics": "MAP(VARCHAR, MAP(VARCHAR, DOUBLE))",
    "status": "VARCHAR",
    "decision": "VARCHAR",
    "counts": "JSON",
}
MANIFEST_PATTERN = ("*", "manifest.json")


@dataclass(frozen=True)
class ParquetSource:
    """A lake dataset: the view name, its file glob below the lake root and its partition column."""

    view: str
    pattern: tuple[str, ...]
    partition: str
    partition_type: str
    schema: pa.Schema


LAKE_SOURCES = (
    ParquetSource("lake_events", (EVENTS, "dt=*", "*.parquet"), "dt", "DATE", EVENT_SCHEMA),
    ParquetSource("lake_impressions", (IMPRESSIONS, "dt=*", "*.parquet"), "dt", "DATE", IMPRESSION_SCHEMA),
    ParquetSource(
        "lake_catalog", (CATALOG, "snapshot=*", "items.parquet"), "snapshot", "VARCHAR", CATALOG_SCHEMA
    ),
)


def default_db_path(settings: Settings) -> Path:
    return Path(settings.var_dir) / WAREHOUSE_FILE


def refresh_warehouse(settings: Settings) -> Path:
    """Rebuild the warehouse at its default place from the settings; the nightly DAG's last task."""
    return build_warehouse(
        default_db_path(settings),
        settings.lake.root,
        settings.models.root,
        control_variant=settings.experiments.control,
    )


def build_warehouse(
    db_path: Path, lake_root: str, models_root: str, control_variant: str = "popular"
) -> Path:
    """Write a fresh warehouse file, then swap it in, so open readers keep a consistent old copy."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    staging = db_path.with_name(f".{db_path.name}.{uuid.uuid4().hex}.building")
    try:
        con = duck.connect(str(staging))
        try:
            apply_warehouse(con, lake_root, models_root, control_variant)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(staging, db_path)
    finally:
        for leftover in (staging, staging.with_name(staging.name + ".wal")):
            leftover.unlink(missing_ok=True)
    return db_path


def apply_warehouse(
    con: duckdb.DuckDBPyConnection, lake_root: str, models_root: str, control_variant: str
) -> list[str]:
    """Create every source and analyst view on `con`; returns the sources that are empty stubs."""
    register_sources(con, lake_root, models_root)
    empty = [source.view for source in LAKE_SOURCES if not _create_lake_source(con, lake_root, source)]
    if not _create_registry_sources(con, models_root):
        empty.append("registry_manifests")
    _write_info(con, lake_root, models_root, control_variant, empty)
    for name, sql in view_files():
        try:
            con.execute(sql)
        except duckdb.Error as exc:
            raise RuntimeError(f"warehouse/sql/{name} failed: {exc}") from exc
    return empty


def register_sources(con: duckdb.DuckDBPyConnection, lake_root: str, models_root: str) -> None:
    """Let `con` read the lake and the registry wherever they are (the views name their files by URL)."""
    for root in (lake_root, models_root):
        duck.register_store(con, root)


def register_built_sources(con: duckdb.DuckDBPyConnection) -> None:
    """The same for a connection to a built warehouse, from the roots it was built over."""
    for lake_root, models_root in con.execute("SELECT lake_root, models_root FROM warehouse_info").fetchall():
        register_sources(con, lake_root, models_root)


def view_files() -> list[tuple[str, str]]:
    """(file name, SQL) of every analyst view file, in the order they are applied."""
    # A plain path next to this module: importlib.resources trips over the editable install's
    # namespace-package mapping, and the sql/ folder ships beside the module either way.
    return [(path.name, path.read_text(encoding="utf-8")) for path in sorted(SQL_DIR.glob("*.sql"))]


def _create_lake_source(con: duckdb.DuckDBPyConnection, lake_root: str, source: ParquetSource) -> bool:
    """A view over the dataset's files; an empty view of its schema when it has none. True if live."""
    location = _files_location(lake_root, source.pattern)
    if location is None:
        _create_empty_view(con, source.view, source.schema, {source.partition: source.partition_type})
        return False
    con.execute(
        f"CREATE OR REPLACE VIEW {source.view} AS SELECT * FROM read_parquet({_literal(location)}, "
        f"hive_partitioning = true, union_by_name = true, "
        f"hive_types = {{'{source.partition}': {source.partition_type}}})"
    )
    return True


def _create_registry_sources(con: duckdb.DuckDBPyConnection, models_root: str) -> bool:
    """Views over every version's manifest.json and the CURRENT pointer. True if any manifest exists."""
    fs, root = fsspec.core.url_to_fs(models_root)
    # read_text yields no row (not an error) when CURRENT is missing, so this view is always live.
    current = _duckdb_location(fs, f"{root.rstrip('/')}/CURRENT")
    con.execute(
        f"CREATE OR REPLACE VIEW registry_current AS "
        f"SELECT trim(content) AS version FROM read_text({_literal(current)})"
    )
    location = _files_location(models_root, MANIFEST_PATTERN)
    if location is None:
        nulls = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in MANIFEST_COLUMNS.items())
        con.execute(f"CREATE OR REPLACE VIEW registry_manifests AS SELECT {nulls} WHERE false")
        return False
    columns = ", ".join(f"{name}: '{kind}'" for name, kind in MANIFEST_COLUMNS.items())
    con.execute(
        f"CREATE OR REPLACE VIEW registry_manifests AS SELECT * FROM read_json({_literal(location)}, "
        f"columns = {{{columns}}}, format = 'auto')"
    )
    return True


def sources_filled_since_build(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Sources that were empty at build time but have files now: a rebuild makes them live."""
    lake_root, models_root, empty = con.execute(
        "SELECT lake_root, models_root, empty_sources FROM warehouse_info"
    ).fetchone() or (None, None, [])
    patterns = {source.view: (lake_root, source.pattern) for source in LAKE_SOURCES}
    patterns["registry_manifests"] = (models_root, MANIFEST_PATTERN)
    return [view for view in empty if view in patterns and _files_location(*patterns[view]) is not None]


def _files_location(root_url: str, pattern: tuple[str, ...]) -> str | None:
    """The glob DuckDB should read for `pattern` below `root_url`, or None when it matches no file."""
    fs, root = fsspec.core.url_to_fs(root_url)
    path = "/".join([root.rstrip("/"), *pattern])
    return _duckdb_location(fs, path) if fs.glob(path) else None


def _create_empty_view(
    con: duckdb.DuckDBPyConnection, view: str, schema: pa.Schema, partition: dict[str, str]
) -> None:
    """An empty view whose columns are the contract schema's (plus the hive partition column)."""
    con.register("_contract_schema", schema.empty_table())
    try:
        con.execute(f"CREATE OR REPLACE TABLE _empty_{view} AS SELECT * FROM _contract_schema")
    finally:
        con.unregister("_contract_schema")
    extra = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in partition.items())
    con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT *, {extra} FROM _empty_{view}")


def _write_info(
    con: duckdb.DuckDBPyConnection, lake_root: str, models_root: str, control_variant: str, empty: list[str]
) -> None:
    """One row saying what this warehouse was built from; experiment_results reads the control."""
    con.execute(
        "CREATE OR REPLACE TABLE warehouse_info AS SELECT "
        "CAST(? AS TIMESTAMPTZ) AS built_at, ? AS lake_root, ? AS models_root, ? AS control_variant, "
        "CAST(? AS VARCHAR[]) AS empty_sources",
        [datetime.now(UTC), lake_root, models_root, control_variant, empty],
    )


def _duckdb_location(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A local path as an absolute path; anything else as the URL DuckDB's httpfs reads."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return path if "file" in protocols or "local" in protocols else fs.unstrip_protocol(path)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
