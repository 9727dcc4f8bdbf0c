"""`recs bench serve --instructions N`: the instructions Redis runs per recommendation request, counted by
valgrind's callgrind, on the live state `recs bench serve` builds (synthetic, or a store's lake).

Counted, not timed, for the reason bench/instructions.py gives: the same requests give the same count on
a busy machine, where timed runs drift by tens of percent. Redis' side of a request is serving's read
script (the person's and session's state, co-visits, session-kNN) and today's counts; on a store's own
clicks it is the larger part of a request's cost (docs/performance.md), and one Redis serves every worker.

The state is built once on a plain Redis and saved; each tree (this checkout and, with `against`, another
one, e.g. a worktree of main) then serves the same N requests in a child process with that tree first on
the path, against its own redis-server under callgrind started from that snapshot. The child warms up
(scripts loaded, the item flags copied) on requests not counted, stops the serving state's background
threads, and reads today's counts live on every request (`today_counts_refresh_s` 0: no clock-driven
copy), so the count is the requests' own. Both trees' lists must be identical, as with `--in-process`.
With `worker`, the child runs under callgrind too (bench/instructions.under_callgrind) and its own
instructions are counted over the same requests: the recommender's side, which `--in-process` can only time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.instructions import CountedRedis
    from bench.serve import RealLake

HERE = Path(__file__).resolve()
WARM_UP = 20  # requests served before counting: scripts loaded, item flags copied


def run_serve_instructions(
    requests: int = 300,
    against: Path | None = None,
    real: RealLake | None = None,
    visitors: int = 2000,
    items: int = 50_000,
    users: int = 100_000,
    worker: bool = False,
) -> dict[str, Any]:
    """`items` and `users` size the synthetic model (not a lake's). `worker`: the recommender's own
    instructions per request too, its process under callgrind."""
    from bench.instructions import COUNTED_BY, THIS_TREE, CountedRedis
    from bench.serve import bench_state, state_label
    from bench.serve_profile import compare_lists

    trees = {"this": THIS_TREE, **({"against": against.resolve()} if against else {})}
    with tempfile.TemporaryDirectory(prefix="recs-bench-serve-instructions-") as tmp:
        root = Path(tmp)
        live = bench_state(root, real, visitors, WARM_UP + requests, n_items=items, n_users=users)
        try:
            snapshot = _save(live.client, root / "state.rdb")
            version = str(live.client.info("server")["redis_version"])  # the same binary runs under valgrind
        finally:
            live.stop()
        now_s = time.time()
        per_request: dict[str, Any] = {}
        in_worker: dict[str, Any] = {}
        lists: dict[str, list[dict[str, Any]]] = {}
        for name, tree in trees.items():
            # A fresh server each: whatever one tree's requests wrote, the other starts from the same state.
            server = CountedRedis(root / f"counted-{name}", rdb=snapshot)
            try:
                counted, in_child, lists[name] = _serve_counted(
                    server, tree, live.env, live.paths, now_s, root / f"{name}.json", worker
                )
                per_request[name] = round(counted / requests)
                if in_child is not None:
                    in_worker[name] = round(in_child / requests)
            finally:
                server.stop()
    result: dict[str, Any] = {
        "redis_instructions_per_request": per_request,
        **({"worker_instructions_per_request": in_worker} if worker else {}),
        "requests": requests,
        "state": state_label(real),
        "speed_events_folded": live.folded,
        "trees": {name: str(tree) for name, tree in trees.items()},
        "redis_version": version,
        "counted_by": COUNTED_BY + ("; the recommender's process whole, from `go` to its last list" if worker else ""),
    }
    if against is not None:
        for counts in (per_request, in_worker) if worker else (per_request,):
            counts["ratio"] = round(counts["this"] / counts["against"], 4)
        result["lists"] = compare_lists(lists["this"], lists["against"])
    return result


def _save(client: Any, to: Path) -> Path:
    """The server's keyspace as a snapshot file at `to`."""
    client.save()
    folder, name = client.config_get("dir")["dir"], client.config_get("dbfilename")["dbfilename"]
    shutil.copyfile(Path(folder) / name, to)
    return to


def _serve_counted(
    server: CountedRedis, tree: Path, env: dict[str, str], paths: list[str], now_s: float, out: Path, worker: bool
) -> tuple[int, int | None, list[dict[str, Any]]]:
    """Instructions Redis ran while a child of `tree` served `paths` after the warm-up ones, with `worker`
    the child's own (under callgrind); its lists."""
    from bench.instructions import COUNTED_PYTHON_ENV, Callgrind, under_callgrind
    from serving.cli import ONE_BLAS_THREAD

    child_env = {
        **env, **ONE_BLAS_THREAD, **COUNTED_PYTHON_ENV,  # one BLAS thread as `recs serve`
        "PYTHONPATH": str(tree),
        "RECS_REDIS__URL": server.url,
        "RECS_API__TODAY_COUNTS_REFRESH_S": "0",
    }  # fmt: skip
    job = out.with_suffix(".job.json")
    job.write_text(json.dumps({"paths": paths, "now_s": now_s, "warm_up": WARM_UP}))
    command = [sys.executable, str(HERE), str(job), str(out)]
    counts = out.with_suffix(".callgrind.out")
    child = subprocess.Popen(
        under_callgrind(command, counts) if worker else command,
        cwd=tree, env=child_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        counted, in_child = server.counted_child(child, "served", Callgrind(child, counts) if worker else None)
        if child.wait(timeout=1800) != 0:
            raise RuntimeError(f"the counted server's child exited with {child.returncode}")
    finally:
        child.kill()
        child.wait()
    return counted, in_child, json.loads(out.read_text())


def _child(job: Path, out: Path) -> None:
    """Serve the job's paths with the tree first on PYTHONPATH: the warm-up ones, `ready`, the rest on `go`,
    `served`, then their lists to `out`. Uses only what every tree has (as bench/serve_profile.py's child)."""
    import asyncio

    spec = json.loads(job.read_text())
    lists = asyncio.run(_serve(spec["paths"], spec["now_s"], spec["warm_up"]))
    out.write_text(json.dumps(lists))


async def _serve(paths: list[str], now_s: float, warm_up: int) -> list[dict[str, Any]]:
    from bench.serve_profile import _listed, _request
    from serving.core.recommender import recommend
    from serving.main import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        state = app.state.serving
        requests = [_request(path) for path in paths]
        for req in requests[:warm_up]:
            recommend(state, req, now_s=now_s)
        # The background threads' commands (model listener, refreshes) run on a clock, not per request.
        # Stopped through the private fields every compared tree has (close() would also drop the client).
        state._stop.set()
        for thread in state._threads:
            thread.join(timeout=30)
        print("ready", flush=True)
        sys.stdin.readline()
        results = [recommend(state, req, now_s=now_s) for req in requests[warm_up:]]
        print("served", flush=True)
        return [_listed(result) for result in results]


if __name__ == "__main__":
    # Child: `python bench/serve_instructions.py JOB OUT`, the tree under test first on PYTHONPATH.
    sys.path[0] = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    _child(Path(sys.argv[1]), Path(sys.argv[2]))
