"""Read-only analyst access to the warehouse: SELECT statements only, on a read-only connection,
printed as a table, CSV or JSON; and a small interactive shell with the same guard.

Two locks, because a read-only database alone would still let `COPY ... TO` write files into
the lake: the file is opened read_only, and every statement must parse as a SELECT.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

import duckdb

from common import duck
from warehouse.build import register_built_sources

# What a query may be. SHOW, DESCRIBE, SUMMARIZE, FROM-first and VALUES all parse as SELECT.
ALLOWED_STATEMENTS = frozenset({duckdb.StatementType.SELECT})
CELL_WIDTH = 40


class ReadOnlyError(ValueError):
    """A statement that could change something was refused."""


def open_read_only(db_path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection that shows timestamps in UTC, the lake's clock."""
    if not Path(db_path).exists():
        raise FileNotFoundError(f"no warehouse at {db_path}; run `recs warehouse build` first")
    con = duck.connect(str(db_path), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    register_built_sources(con)  # views over s3:// read through fsspec
    return con


def check_select_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise ReadOnlyError unless every statement in `sql` is a SELECT."""
    statements = con.extract_statements(sql)
    if not statements:
        raise ReadOnlyError("no statement given")
    for statement in statements:
        if statement.type not in ALLOWED_STATEMENTS:
            kind = statement.type.name.replace("_STATEMENT", "")
            raise ReadOnlyError(
                f"refused: the warehouse is read-only for analysts, and this is a {kind} statement. "
                "Only SELECT queries run here (SHOW, DESCRIBE and SUMMARIZE too); "
                "COPY, ATTACH, INSTALL/LOAD, SET and every write are refused."
            )


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows of a SELECT (the last one, when several are given)."""
    check_select_only(con, sql)
    cursor = con.execute(sql)
    columns = [d[0] for d in cursor.description or []]
    return columns, cursor.fetchall()


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], max_rows: int = 1000) -> str:
    """A plain aligned text table; long cells are cut, and more than max_rows rows are elided."""
    shown = [[_cell(v) for v in row] for row in rows[:max_rows]]
    widths = [max([len(c), *(len(r[i]) for r in shown)]) for i, c in enumerate(columns)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in shown]
    more = f", showing the first {max_rows}" if len(rows) > max_rows else ""
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")
    return "\n".join(lines)


def write_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([[_plain(v) for v in row] for row in rows])


def to_json(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A JSON array of objects, one per row."""
    return json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=_plain, indent=1)


def repl(
    con: duckdb.DuckDBPyConnection,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> None:
    """A minimal SQL shell: statements end with ';', `.tables` lists views, `.quit` (or EOF) leaves."""
    write("Lambdarec warehouse (read-only). End statements with ';'. .tables lists views, .quit leaves.")
    buffer: list[str] = []
    while True:
        try:
            line = read("... " if buffer else "wh> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        command = line.strip()
        if not buffer and command in {".quit", ".exit", "\\q"}:
            return
        if not buffer and command == ".tables":
            line = "SELECT table_name, table_type FROM information_schema.tables ORDER BY table_name;"
        buffer.append(line)
        if not line.rstrip().endswith(";"):
            continue
        sql, buffer = "\n".join(buffer), []
        try:
            write(format_table(*run_query(con, sql)))
        except (ReadOnlyError, duckdb.Error) as exc:
            write(f"error: {exc}")


def _cell(value: Any) -> str:
    text = "NULL" if value is None else str(_plain(value))
    text = text.replace("\n", " ")
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 1] + "…"


def _plain(value: Any) -> Any:
    """A value as CSV/JSON/text shows it: ISO dates, floats without float noise."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float):
        return float(f"{value:.10g}")
    if isinstance(value, list | dict | tuple):
        return value
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def print_result(columns: list[str], rows: list[tuple[Any, ...]], fmt: str, max_rows: int) -> None:
    if fmt == "csv":
        write_csv(columns, rows, sys.stdout)
    elif fmt == "json":
        sys.stdout.write(to_json(columns, rows) + "\n")
    else:
        sys.stdout.write(format_table(columns, rows, max_rows) + "\n")
