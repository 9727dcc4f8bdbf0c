"""Keeps the N consumer processes of `recs speed run --consumers N` alive.

A child that dies is restarted after a backoff that doubles while it keeps dying young; past
speed.restarts_per_minute restarts in a minute (a crash loop, which restarting does not mend) every
child is stopped and the supervisor exits 1, for whoever runs it to see. SIGTERM stops them all.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

STABLE_S = 60.0  # a child that lived this long died of something new: its backoff starts over
MAX_BACKOFF_S = 30.0


class Child(Protocol):
    """What the supervisor needs of a process (multiprocessing.Process has it)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...
    def start(self) -> None: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


def supervise(
    make_child: Callable[[int], Child],
    count: int,
    stop: threading.Event,
    restarts_per_minute: int,
    backoff_s: float,
    poll_s: float = 0.2,
    on_exit: Callable[[int], None] = lambda pid: None,
) -> int:
    """Run children 0..count-1 until `stop` is set, restarting the dead; returns the exit code (0: all
    stopped cleanly, 1: a child failed to stop cleanly or the restarts went past their bound).
    `on_exit(pid)` is called once for each child seen dead (its metrics' live gauges are dropped)."""
    children = {i: _started(make_child(i)) for i in range(count)}
    born = dict.fromkeys(children, time.monotonic())
    young_deaths = dict.fromkeys(children, 0)
    due: dict[int, float] = {}  # slot -> when its new child starts
    restarts: deque[float] = deque()
    code = 0
    while not stop.is_set():
        now = time.monotonic()
        for i, child in children.items():
            if i in due or child.is_alive():
                continue
            lived = now - born[i]
            young_deaths[i] = 0 if lived >= STABLE_S else young_deaths[i] + 1
            delay = min(MAX_BACKOFF_S, backoff_s * 2 ** max(0, young_deaths[i] - 1))
            due[i] = now + delay
            if child.pid is not None:
                on_exit(child.pid)
            log.warning(
                "consumer %d (pid %s) exited with %s after %.1f s; restarting it in %.1f s",
                i, child.pid, child.exitcode, lived, delay,
            )  # fmt: skip
        for i in [i for i, at in due.items() if at <= now]:
            while restarts and restarts[0] <= now - 60:
                restarts.popleft()
            if len(restarts) >= restarts_per_minute:
                log.error("%d restarts within a minute: stopping every consumer", len(restarts))
                code = 1
                stop.set()
                break
            restarts.append(now)
            del due[i]
            children[i], born[i] = _started(make_child(i)), now
            log.info("consumer %d restarted (pid %s)", i, children[i].pid)
        stop.wait(poll_s)
    code = max(code, _stop_all(list(children.values())))
    for i, child in children.items():
        if i not in due and child.pid is not None:  # those in `due` were reported when they died
            on_exit(child.pid)
    return code


def _started(child: Child) -> Child:
    child.start()
    return child


def _stop_all(children: list[Child]) -> int:
    """SIGTERM each live child (it finishes its batch and exits) and wait; 1 if one ended otherwise."""
    for child in children:
        if child.is_alive():
            child.terminate()
    for child in children:
        child.join()
    return 0 if all(c.exitcode in (0, -signal.SIGTERM) for c in children) else 1
