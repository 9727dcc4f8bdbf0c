"""`recs bench serve --in-process`: the recommender's CPU and Redis cost per request, in one process, on the
live state `recs bench serve` builds, with a profile, the served lists, and the app's own CPU around the
recommender.

The state (model, catalog, speed state of the request mix's people) is built once; each round then runs
the request mix in a fresh process per code tree: this checkout and, with `--against DIR`, another one
(e.g. a worktree of main), alternately, on the same Redis at the same moment. So the CPU figures of both
are side by side and their lists must be identical: that is the kept check of an optimisation. The state
is written by this tree's speed consumer, so a change to what the speed layer stores (a Redis value's
format) cannot be compared this way: the other tree would read this one's format. Run each tree alone.

The child process is this file run as a script with the tree under test first on PYTHONPATH; it uses
only what every tree has (`create_app`, `recommend`, `RecRequest`, and the recommendations route's
`recommend_body`, whose module calls `recommend`).
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from bench.serve import RealLake

HERE = Path(__file__).resolve()
THIS_TREE = HERE.parents[1]


def run_requests(paths: list[str], now_s: float, passes: int, profile: bool) -> dict[str, Any]:
    """In this process: start the app (its lifespan starts the serving state from the environment's
    settings), run every path once to warm up, then `passes` timed passes of the recommender; CPU per
    request, Redis commands and reply bytes per request, the lists, the app's own cost around the
    recommender (`app_requests`), and (with `profile`) the top functions of one more pass."""
    return asyncio.run(_run_requests(paths, now_s, passes, profile))


async def _run_requests(paths: list[str], now_s: float, passes: int, profile: bool) -> dict[str, Any]:
    from serving.core.metrics import StageClock
    from serving.core.recommender import recommend
    from serving.main import create_app

    app = create_app()
    async with app.router.lifespan_context(app):
        state = app.state.serving
        # The background threads (model listener, day-count and erasure refreshes) would add their Redis
        # commands and CPU to the requests'; the state they loaded at start is what requests read.
        state._stop.set()
        for thread in state._threads:
            thread.join(timeout=10)
        # Except the copy of today's counts, where the tree keeps one: at this rate its re-reads stand for
        # the requests' own reads of today, so its Redis commands and CPU are theirs.
        today_loop = getattr(state, "_today_counts_loop", None)
        if today_loop is not None and state.day_counts.today_refresh_s > 0:
            state._stop.clear()
            state._spawn(today_loop, "today-counts-refresh")
        requests = [_request(path) for path in paths]
        client = state.redis.client
        results = [recommend(state, req, now_s=now_s) for req in requests]
        lists = [_listed(result) for result in results]
        cpu_ms, redis_deltas, stages = [], [], []
        for _ in range(passes):
            before = _redis_counters(client)
            spent: dict[str, float] = {}
            start = time.process_time()
            for req in requests:
                clock = StageClock()
                recommend(state, req, now_s=now_s, clock=clock)
                for stage, seconds in clock.spent.items():
                    spent[stage] = spent.get(stage, 0.0) + seconds
            cpu_ms.append((time.process_time() - start) * 1000 / len(requests))
            redis_deltas.append(_delta(before, _redis_counters(client), len(requests)))
            per_request = {stage: round(seconds * 1000 / len(requests), 4) for stage, seconds in spent.items()}
            stages.append(per_request)
        app_us = await app_requests(app, paths, dict(zip(requests, results, strict=True)), passes)
        top: list[str] = []
        if profile:
            profiler = cProfile.Profile(time.process_time)  # CPU, not the waits on Redis's replies
            profiler.enable()
            for req in requests:
                recommend(state, req, now_s=now_s)
            profiler.disable()
            top = _top_functions(profiler, "tottime", 30) + _top_functions(profiler, "cumulative", 40)
    middle = sorted(range(passes), key=lambda i: cpu_ms[i])[passes // 2]
    return {
        "cpu_ms_per_request": round(statistics.median(cpu_ms), 4),
        "cpu_ms_passes": [round(v, 4) for v in cpu_ms],
        "app_us_per_request": round(statistics.median(app_us), 1),
        "redis": redis_deltas[middle],
        "stage_ms": stages[middle],  # wall, in this process: "reads" includes waiting for Redis
        "profile_top": top,
        "lists": lists,
    }


async def app_requests(app: Any, paths: list[str], answers: dict[Any, Any], passes: int) -> list[float]:
    """CPU µs a request of the app around the recommender, per pass: each path through the whole ASGI
    app (middleware, routing, scope check, query, body, impression log), the recommender's answer
    replayed from `answers` (request -> result) so that only the rest is timed. No sockets: the server's
    own cost is the no-op route's, which `recs bench serve` measures."""
    import serving.api.routes.recommendations as route

    def replayed(state: Any, req: Any, **_: Any) -> Any:
        return answers[req]

    # recommend_body calls the recommender: in the route's module in older trees, in its own since.
    caller: Any = sys.modules[route.recommend_body.__module__]
    real, caller.recommend = caller.recommend, replayed
    try:
        for path in paths:  # warm-up; every answer must be a list (a refusal would time less work)
            status = await _asgi_get(app, path)
            assert status == 200, f"{path}: {status}"
        cpu_us = []
        for _ in range(passes):
            start = time.process_time()
            for path in paths:
                await _asgi_get(app, path)
            cpu_us.append((time.process_time() - start) * 1e6 / len(paths))
        return cpu_us
    finally:
        caller.recommend = real


async def _asgi_get(app: Any, path: str) -> int:
    """GET `path` through the ASGI app as uvicorn would hand it over; the response's status."""
    url = urlsplit(path)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": url.path, "raw_path": url.path.encode(), "query_string": url.query.encode(), "root_path": "",
        "headers": [(b"host", b"bench")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


def _request(path: str) -> Any:
    """A bench path (`/v1/recommendations?...`) as the route builds its RecRequest."""
    from serving.core.recommender import RecRequest

    query = dict(parse_qsl(urlsplit(path).query))
    return RecRequest(
        query.get("user_id"), query.get("anonymous_id"), query.get("session_id"), int(query.get("k", 10)),
        query.get("context", "home"), query.get("item_id"),
    )  # fmt: skip


def _listed(result: Any) -> dict[str, Any]:
    """What a list comparison holds equal: everything but the random request id."""
    return {
        "model_version": result.model_version,
        "variant": result.variant,
        "degraded": result.degraded,
        "items": [[i.item_id, i.score, i.reason, i.sources, i.category, i.promoted] for i in result.items],
    }


def _redis_counters(client: Any) -> dict[str, Any]:
    """Commands by name (script-internal ones included), their server time, reply bytes, and the server's CPU."""
    commands = client.info("commandstats")
    stats, cpu = client.info("stats"), client.info("cpu")
    return {
        "calls": {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commands.items()},
        "usec": {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in commands.items()},
        "out_bytes": int(stats["total_net_output_bytes"]),
        "in_bytes": int(stats["total_net_input_bytes"]),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def _delta(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    """Per request between two counter reads (the INFO calls themselves left out)."""
    calls = {
        name: (count - before["calls"].get(name, 0)) / n
        for name, count in after["calls"].items()
        if name != "info" and count > before["calls"].get(name, 0)
    }
    # A script's time includes the commands it runs (also listed under their own names).
    usec = {name: (v - before["usec"].get(name, 0)) / n for name, v in after["usec"].items() if name in calls}
    return {
        "commands_per_request": round(sum(calls.values()), 2),
        "by_command": {name: round(v, 2) for name, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        "usec_by_command": {name: round(v, 1) for name, v in sorted(usec.items(), key=lambda kv: -kv[1])},
        "reply_bytes_per_request": round((after["out_bytes"] - before["out_bytes"]) / n),
        "request_bytes_per_request": round((after["in_bytes"] - before["in_bytes"]) / n),
        "cpu_ms_per_request": round((after["cpu_s"] - before["cpu_s"]) * 1000 / n, 4),
    }


def _top_functions(profiler: cProfile.Profile, order: str, n: int) -> list[str]:
    """The profile's first `n` functions by `order` (tottime: own time; cumulative: with callees), a header line first."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats(order).print_stats(n)
    rows = [line.strip() for line in out.getvalue().splitlines()]
    start = next((i for i, line in enumerate(rows) if line.startswith("ncalls")), 0)
    return [f"by {order}: " + " ".join(line.split()) for line in rows[start : start + n + 1] if line]


def compare_lists(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], tolerance: float = 1e-6) -> dict[str, Any]:
    """How many lists are identical (same items, order, reasons, sources; scores within `tolerance`)."""
    same, first_difference = 0, None
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if _same_list(a, b, tolerance):
            same += 1
        elif first_difference is None:
            first_difference = {"request": i, "ours": a, "theirs": b}
    return {"identical": same, "compared": len(ours), "first_difference": first_difference}


def _same_list(a: dict[str, Any], b: dict[str, Any], tolerance: float) -> bool:
    if {k: v for k, v in a.items() if k != "items"} != {k: v for k, v in b.items() if k != "items"}:
        return False
    if len(a["items"]) != len(b["items"]):
        return False
    for x, y in zip(a["items"], b["items"], strict=True):
        if x[0] != y[0] or x[2:] != y[2:] or abs(x[1] - y[1]) > tolerance:
            return False
    return True


def _run_child(tree: Path, env: dict[str, str], job: Path, out: Path) -> dict[str, Any]:
    """This file as a script under `tree`'s code (first on PYTHONPATH)."""
    from serving.cli import ONE_BLAS_THREAD

    child_env = {**env, **ONE_BLAS_THREAD, "PYTHONPATH": str(tree)}  # as `recs serve`
    subprocess.run([sys.executable, str(HERE), str(job), str(out)], env=child_env, check=True, cwd=tree)
    return dict(json.loads(out.read_text()))


def bench_in_process(
    against: Path | None = None,
    rounds: int = 3,
    passes: int = 2,
    profile: bool = True,
    visitors: int = 2000,
    requests: int = 2000,
    real: RealLake | None = None,
) -> dict[str, Any]:
    """Build the live state once; then `rounds` rounds of this tree's code and `against`'s (when given),
    each in a fresh process over the same requests at the same moment, the order swapped every round.
    Medians over rounds of each child's median pass, and of the rounds' ratios."""
    from bench.serve import bench_state, state_label

    with tempfile.TemporaryDirectory(prefix="recs-bench-inproc-") as tmp:
        root = Path(tmp)
        live = bench_state(root, real, visitors, requests)
        try:
            now_s = time.time()
            trees = {"this": THIS_TREE, **({"against": against.resolve()} if against else {})}
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            for r in range(rounds):
                job = root / f"job-{r}.json"
                # The profile (slow under cProfile) in the last round only.
                job.write_text(json.dumps({"paths": live.paths, "now_s": now_s, "passes": passes,
                                           "profile": profile and r == rounds - 1}))  # fmt: skip
                # Each round swaps which tree goes first: a fixed order would give one of them the warmer
                # (or the more disturbed) half of every round.
                for name, tree in alternating(list(trees.items()), r):
                    runs[name].append(_run_child(tree, live.env, job, root / f"{name}-{r}.json"))
        finally:
            live.stop()
    result: dict[str, Any] = {
        "requests": len(live.paths),
        "speed_events_folded": live.folded,
        "state": state_label(real),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for name, outs in runs.items():
        cpu = [o["cpu_ms_per_request"] for o in outs]
        result[name] = {
            "tree": str(trees[name]),
            "cpu_ms_per_request": round(statistics.median(cpu), 4),
            "cpu_ms_rounds": cpu,
            "app_us_per_request": round(statistics.median(o["app_us_per_request"] for o in outs), 1),
            "app_us_rounds": [o["app_us_per_request"] for o in outs],
            "redis": outs[len(outs) // 2]["redis"],
            "stage_ms": outs[len(outs) // 2]["stage_ms"],
            "profile_top": outs[-1]["profile_top"],
        }
        # Every round served the same lists (the state does not change under reads).
        result[name]["rounds_identical"] = all(o["lists"] == outs[0]["lists"] for o in outs)
    if against is not None:
        ours, theirs = runs["this"][0]["lists"], runs["against"][0]["lists"]
        result["lists"] = compare_lists(ours, theirs)
        result["cpu_ratio_this_to_against"] = round(
            result["this"]["cpu_ms_per_request"] / result["against"]["cpu_ms_per_request"], 3
        )
        # Side by side within each round, then the median: steadier than a ratio of medians when the
        # machine's speed drifts between rounds.
        ratios = [
            ours["cpu_ms_per_request"] / theirs["cpu_ms_per_request"]
            for ours, theirs in zip(runs["this"], runs["against"], strict=True)
        ]
        result["cpu_ratio_rounds"] = [round(v, 3) for v in ratios]
        result["cpu_ratio_median_of_rounds"] = round(statistics.median(ratios), 3)
        app_ratios = [
            ours["app_us_per_request"] / theirs["app_us_per_request"]
            for ours, theirs in zip(runs["this"], runs["against"], strict=True)
        ]
        result["app_ratio_rounds"] = [round(v, 3) for v in app_ratios]
        result["app_ratio_median_of_rounds"] = round(statistics.median(app_ratios), 3)
    return result


def alternating(items: list[Any], round_no: int) -> list[Any]:
    """`items` in order in even rounds, reversed in odd ones."""
    return items if round_no % 2 == 0 else items[::-1]


if __name__ == "__main__":
    # Child: `python bench/serve_profile.py JOB OUT`, the tree under test first on PYTHONPATH.
    # The tree under test instead of this file's folder (whose modules would shadow top-level names).
    sys.path[0] = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    spec = json.loads(Path(sys.argv[1]).read_text())
    answer = run_requests(spec["paths"], spec["now_s"], spec["passes"], spec["profile"])
    Path(sys.argv[2]).write_text(json.dumps(answer))
