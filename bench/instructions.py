"""`recs bench speed --instructions N`: the instructions Redis runs per event the speed layer applies,
counted by valgrind's callgrind.

Counted, not timed: this machine's speed drifts by tens of percent within minutes, so the timed figures
of bench/speed.py cannot show a change of a few percent to Redis' side, and a count can (the same events
give the same count to ~0.3 %). The speed layer's throughput is bounded by Redis where Redis is the
busier side (visitors browsing at once: each event is another person's, nothing is shared in a call).

Redis runs under callgrind with counting off. Each tree (this checkout and, with `against`, another one,
e.g. a worktree of main) drains the same N events of each of bench/speed.py's mixes from a fresh state,
in a child process with that tree first on the path (as bench/serve_profile.py does); counting is on
from the child's first read to its last acknowledgement, script loads included. Trending re-sums,
claims of idle entries, the bandit's impression count and the stream gauges run on a clock, not per
event: they are off here. Redis' own clock-driven work
(serverCron, ~2 % of a run, more the slower the machine) is not counted either: only reading and running
commands and writing their replies (`COMMAND_PATH`).

With `consumer`, the consumer's process runs under callgrind too (`under_callgrind`, its hashes seeded
and one BLAS thread) and is counted over the same window, whole: decoding, planning, packing the script
calls. The consumer's side is the other half of an event's cost, and timed runs cannot show a change of
a few percent to it either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve()
THIS_TREE = HERE.parents[1]

MIXES = ("in_a_row", "browsing")  # bench/speed.py's: each session's events in a row, visitors browsing at once
_TOTALS = re.compile(r"^totals: (\d+)$", re.M)
_NEVER_S = "1e9"  # a clock's period that never comes within a run
# Redis' functions that read and run a client's commands and write their replies: callgrind counts inside
# them only. Everything else in its event loop (serverCron's ticks above all) runs by the clock, so it
# counts more on a slower machine and moved a count by over 1 % between runs of the same requests. The
# slow log is off for the same reason: under callgrind a script passes its 10 ms, as it would not outside.
COMMAND_PATH = ("readQueryFromClient", "writeToClient")
COUNTED_BY = f"valgrind --tool=callgrind (Ir), inside {' and '.join(COMMAND_PATH)} only"


class CountedRedis:
    """A redis-server under callgrind on a free port, counting the instructions of its command path
    (`COMMAND_PATH`) only inside `counted`."""

    def __init__(self, root: Path, start_timeout_s: float = 120.0, rdb: Path | None = None) -> None:
        """`rdb`: a snapshot (SAVE's file) the server starts from, instead of an empty keyspace."""
        import redis

        from common.redis_server import free_port

        valgrind, server = shutil.which("valgrind"), shutil.which("redis-server")
        if valgrind is None or server is None:
            raise RuntimeError("valgrind and redis-server are needed: run `make setup` (Debian: apt-get install valgrind)")
        root.mkdir(parents=True, exist_ok=True)
        snapshot: tuple[str, ...] = ()
        if rdb is not None:
            shutil.copyfile(rdb, root / "start.rdb")
            snapshot = ("--dbfilename", "start.rdb")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        out = root / "callgrind.out"
        self.process = subprocess.Popen(
            [valgrind, "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
             *(f"--toggle-collect={function}" for function in COMMAND_PATH), f"--callgrind-out-file={out}",
             server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
             "--appendonly", "no", "--slowlog-log-slower-than", "-1", *snapshot],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.counter = Callgrind(self.process, out)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # BusyLoadingError (the snapshot loading) included
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server under valgrind did not answer") from None
                time.sleep(0.1)
            finally:
                client.close()

    def counted(self, run: Callable[[], None]) -> int:
        """The instructions Redis ran on its command path while `run()` ran."""
        self.counter.start()
        try:
            run()
        finally:
            counted = self.counter.stop()
        return counted

    def counted_child(
        self, child: subprocess.Popen[str], done: str, inner: Callgrind | None = None
    ) -> tuple[int, int | None]:
        """The instructions Redis ran on its command path while `child` worked, and with `inner` (the
        child under callgrind) the child's own: the child says `ready`, works once told `go`, then says
        `done`."""
        stdin, stdout = child.stdin, child.stdout
        assert stdin is not None and stdout is not None
        _expect_line(stdout, "ready", child)
        inner_counted: list[int] = []

        def work() -> None:
            if inner is not None:
                inner.start()
            stdin.write("go\n")
            stdin.flush()
            _expect_line(stdout, done, child)
            if inner is not None:
                inner_counted.append(inner.stop())

        return self.counted(work), (inner_counted[0] if inner_counted else None)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Callgrind:
    """Counting in a process that runs under callgrind with instrumentation off: `start` zeroes the count
    and turns it on, `stop` turns it off and returns what it counted in between (callgrind_control)."""

    def __init__(self, process: subprocess.Popen[Any], out: Path) -> None:
        """`out`: the process' --callgrind-out-file (dump n goes to `out`.n)."""
        self.process, self._out, self._dumps = process, out, 0

    def start(self) -> None:
        self._control("--zero")
        self._control("--instr=on")

    def stop(self) -> int:
        self._control("--instr=off")
        self._dumps += 1
        self._control("--dump")
        return self._totals(Path(f"{self._out}.{self._dumps}"))

    def _control(self, command: str) -> None:
        subprocess.run(
            ["callgrind_control", command, str(self.process.pid)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @staticmethod
    def _totals(dump: Path, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = _TOTALS.search(dump.read_text()) if dump.exists() else None
            if found:
                return int(found.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no totals to {dump}")


def run_speed_instructions(
    events: int = 5_000,
    items: int = 50_000,
    users: int = 20_000,
    factors: int = 64,
    seed: int = 0,
    against: Path | None = None,
    consumer: bool = False,
) -> dict[str, Any]:
    """Redis' instructions per event of each mix (and with `consumer`, the consumer's own, its process
    under callgrind too) for this tree and `against`'s, on the same traffic."""
    from bench.speed import OFFERED_PER_S, _fresh_state, _publish_model, _settings, _visitors, append_traffic
    from common.redis_server import connect

    trees = {"this": THIS_TREE, **({"against": against.resolve()} if against else {})}
    with tempfile.TemporaryDirectory(prefix="recs-bench-instructions-") as tmp:
        root = Path(tmp)
        server = CountedRedis(root)
        try:
            settings = _settings(root, server.url)
            client = connect(server.url, timeout_s=60)
            _publish_model(settings, items, users, factors, seed)
            redis_per_event: dict[str, dict[str, Any]] = {}
            consumer_per_event: dict[str, dict[str, Any]] = {}
            for mix in MIXES:
                visitors = _visitors(OFFERED_PER_S, users) if mix == "browsing" else None
                for name, tree in trees.items():
                    _fresh_state(client, items)
                    client.script_flush()  # each tree loads (and Redis compiles) its scripts while counted
                    append_traffic(client, settings, events, items, users, seed, visitors)
                    on_redis, in_consumer = _drain_counted(server, tree, root, f"{mix}-{name}" if consumer else None)
                    redis_per_event.setdefault(mix, {})[name] = round(on_redis / events)
                    if in_consumer is not None:
                        consumer_per_event.setdefault(mix, {})[name] = round(in_consumer / events)
            version = client.info("server")["redis_version"]
        finally:
            server.stop()
    if against:
        for counts in (*redis_per_event.values(), *consumer_per_event.values()):
            counts["ratio"] = round(counts["this"] / counts["against"], 4)
    return {
        "redis_instructions_per_event": redis_per_event,
        **({"consumer_instructions_per_event": consumer_per_event} if consumer else {}),
        "events": events,
        "items": items,
        "users_with_vectors": users,
        "trees": {name: str(tree) for name, tree in trees.items()},
        "redis_version": version,
        "counted_by": COUNTED_BY + ("; the consumer's process whole, from `go` to its last acknowledgement" if consumer else ""),
    }


def _drain_counted(
    server: CountedRedis, tree: Path, root: Path, consumer_label: str | None
) -> tuple[int, int | None]:
    """Instructions Redis ran while a consumer of `tree` drained the stream (started, then counted), and
    with a `consumer_label` the consumer's own (its process under callgrind, its hashes seeded and one
    BLAS thread, so that the same events count the same; the label names its callgrind files)."""
    from serving.cli import ONE_BLAS_THREAD

    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "RECS_VAR_DIR": str(root),
        "RECS_REDIS__URL": server.url,
        "RECS_LAKE__ROOT": str(root / "lake"),
        "RECS_MODELS__ROOT": str(root / "models"),
        # The consumer's clock-driven work is off: its count would follow the machine's speed (the
        # bandit's impression count, every 2 s, also drained the batches in flight: ±2 % on 600 events).
        "RECS_SPEED__TRENDING_REFRESH_S": _NEVER_S,
        "RECS_SPEED__CLAIM_INTERVAL_S": _NEVER_S,
        "RECS_EXPERIMENTS__COUNT_INTERVAL_S": _NEVER_S,
        "RECS_METRICS__STREAM_REFRESH_S": _NEVER_S,
    }
    command = [sys.executable, str(HERE)]
    out = None if consumer_label is None else root / f"consumer-{consumer_label}.callgrind.out"
    if out is not None:
        env.update(ONE_BLAS_THREAD, **COUNTED_PYTHON_ENV)
        command = under_callgrind(command, out)
    child = subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        return server.counted_child(child, "drained", None if out is None else Callgrind(child, out))
    finally:
        child.kill()
        child.wait()


# A Python process counted under callgrind: its hashes seeded (a set's or dict's order moves a count), and
# Redis under valgrind too answers tens of times slower than a client's usual timeout allows.
COUNTED_PYTHON_ENV = {"PYTHONHASHSEED": "0", "RECS_REDIS__SOCKET_TIMEOUT_S": "120"}


def under_callgrind(command: list[str], out: Path) -> list[str]:
    """`command` run under callgrind with instrumentation off until `Callgrind.start`; its dumps go to
    `out`.n and valgrind's own messages to `out`.log."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", f"--log-file={out}.log", *command]


def _expect_line(stdout: IO[str], line: str, child: subprocess.Popen[str]) -> None:
    """The counted child's next line is `line` (its handshake), else what it said and its exit code."""
    said = stdout.readline().strip()
    if said != line:
        raise RuntimeError(f"the counted child said {said!r}, not {line!r} (exit code {child.poll()})")


def _child() -> None:
    """A consumer of the tree first on PYTHONPATH: warms up, says `ready`, drains on `go`, says `drained`.
    Uses only what every tree has (the settings from the environment, `SpeedConsumer`)."""
    sys.path[0] = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    from common.redis_server import connect
    from common.settings import Settings
    from speed_layer.consumer import SpeedConsumer

    settings = Settings()
    consumer = SpeedConsumer(connect(settings.redis.effective_url, timeout_s=60), settings, name="counted")
    consumer.warm_up()
    print("ready", flush=True)
    sys.stdin.readline()
    while consumer.pump(block=False):
        pass
    print("drained", flush=True)


if __name__ == "__main__":
    _child()
