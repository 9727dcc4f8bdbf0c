"""Times the warehouse's daily_kpis and funnel views over a whole lake (target: < 1 s each on ~1M events)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import duck

TIMED_VIEWS = ("daily_kpis", "funnel")


def run_warehouse_bench(lake: Path, repeat: int = 3) -> dict[str, Any]:
    """Build a throwaway warehouse over `lake` and time a full read of each timed view."""

    from warehouse.build import build_warehouse

    with tempfile.TemporaryDirectory(prefix="recs-bench-wh-") as tmp:
        started = time.perf_counter()
        # No registry: model_runs stays empty, which the timed views do not touch.
        db_path = build_warehouse(Path(tmp) / "warehouse.duckdb", str(lake), str(Path(tmp) / "no-models"))
        build_s = time.perf_counter() - started
        con = duck.connect(str(db_path), read_only=True)
        try:
            result: dict[str, Any] = {
                "bench": "warehouse",
                "lake": str(lake),
                "events": con.execute("SELECT count(*) FROM events").fetchone()[0],  # type: ignore[index]
                "threads": con.execute("SELECT current_setting('threads')").fetchone()[0],  # type: ignore[index]
                "build_s": round(build_s, 4),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            for view in TIMED_VIEWS:
                result.update(_time_view(con, view, repeat))
        finally:
            con.close()
    return result


def _time_view(con: Any, view: str, repeat: int) -> dict[str, Any]:
    """First (cold) and best-of-`repeat` wall time of fetching every row of a view, with the
    process CPU time of that best run: on a shared machine wall time also measures the
    neighbours, CPU time / threads is what the query would take with the cores to itself."""
    timings = []
    rows = 0
    for _ in range(repeat + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        rows = len(con.execute(f"SELECT * FROM {view}").fetchall())
        timings.append((time.perf_counter() - wall, time.process_time() - cpu))
    best_wall, best_cpu = min(timings[1:])
    return {
        f"{view}_first_s": round(timings[0][0], 4),
        f"{view}_best_s": round(best_wall, 4),
        f"{view}_best_cpu_s": round(best_cpu, 4),
        f"{view}_rows": rows,
    }
