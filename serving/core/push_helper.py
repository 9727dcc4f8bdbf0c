"""A worker's push helper: a process of lower priority that computes the lists of the worker's live streams.

A pushed list costs what a GET costs (~3 ms of CPU). Computed in the worker, a GET that arrives
meanwhile waits for it, and the lists take the CPU at the requests' priority: with 200 streams
open the GETs' p99 doubled (`recs bench push`). So each worker starts a helper with its first
stream: a process with its own serving state (model, catalog, Redis; `ServingState.start`, as a
worker's), niced (`api.push_helper_nice`) so that the kernel runs requests first. The worker sends
it the request and serves requests while it computes. The cost is memory: each helper holds a copy
of the model (`api.push_helper` false computes the lists in the worker, as before).

The two talk over the helper's stdin and stdout in frames (a length, then a pickle), which the
worker reads without blocking: a niced writer preempted mid-answer must not stall the worker's loop.

It degrades rather than fails: while the helper starts, and for a second after it died or stopped
answering, the worker computes the list itself; then a new helper is started (the second doubles, up
to a minute, while helpers die before they are ready: a start that keeps failing).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import struct
import sys
import threading
import time
from typing import IO, Any

from common.settings import Settings
from serving.core import metrics
from serving.core.recommender import RecRequest, RecResult
from serving.core.response_body import recommend_body
from serving.core.state import ServingState, single_threaded_blas

log = logging.getLogger(__name__)

RESTART_AFTER_S = 1.0  # after a helper was lost, before the next is started
MAX_RESTART_AFTER_S = 60.0  # the delay doubles while helpers are lost before getting ready (a start that fails)
# A list takes milliseconds; one not back by then means the helper is stuck (it is killed).
ANSWER_TIMEOUT_S = 5.0
READY = -1  # the job number of the helper's first message, sent once its state is loaded
HEADER = struct.Struct("!Q")  # a frame's length
Answer = tuple[RecResult, bytes]


class HelperLost(Exception):
    """The helper died, was killed, or did not answer in time: the worker computes the list."""


def frame(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


# ---------------------------------------------------------------- the helper process


def main() -> None:
    """The helper (`python -m serving.core.push_helper`, started by a worker): read its settings and niceness,
    load the serving state, then answer each (job, request) with (job, result, body) or (job, error) until
    the worker closes its stdin or dies."""
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to the log, not into the frames
    settings, niceness = _read_frame(requests)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s push-helper[%(process)d] %(levelname)s %(message)s")
    os.nice(niceness)
    single_threaded_blas()
    state = ServingState.start(settings)
    _exit_with(os.getppid())
    _write(answers, (READY, os.getpid()))
    while (message := _read_frame(requests)) is not None:
        job, req = message
        try:
            answer: tuple[Any, ...] = (job, *recommend_body(state, req))
        except Exception as exc:  # the worker raises it where the list was asked for
            answer = (job, exc)
        _write(answers, answer)
    state.close()


def _read_frame(stream: IO[bytes]) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None  # the worker closed the pipe
    return pickle.loads(stream.read(HEADER.unpack(header)[0]))


def _write(stream: IO[bytes], message: object) -> None:
    stream.write(frame(message))
    stream.flush()


def _exit_with(parent: int) -> None:
    """End this process if its worker dies while a list is being computed (stdin says so only at a read)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# ---------------------------------------------------------------- the worker's side


class PushHelper:
    """The worker's handle on its helper: started on first use, replaced when lost."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = False
        self._answers: dict[int, asyncio.Future[Answer]] = {}
        self._jobs = itertools.count()
        self._start_after = 0.0  # monotonic
        self._failed_starts = 0  # helpers lost in a row before they got ready

    @property
    def offloads(self) -> bool:
        """Whether the next list is computed in the helper (else in the worker, which then defers it)."""
        return self._ready

    @property
    def waiting(self) -> int:
        """Lists asked of the helper and not answered yet."""
        return len(self._answers)

    @property
    def pid(self) -> int | None:
        """The helper's process id while one is started."""
        return self._process.pid if self._process is not None else None

    async def list_for(self, state: ServingState, req: RecRequest) -> Answer:
        """The list for a live stream's request and its body, as GET /v1/recommendations computes them."""
        await self._start_if_due()
        if self._ready:
            try:
                answer = await self._ask(req)
            except HelperLost as exc:
                log.warning("push helper lost (%s): lists are computed in the worker for now", exc)
                self._lose()
            else:
                metrics.PUSH_COMPUTED_BY.labels("helper").inc()
                return answer
        metrics.PUSH_COMPUTED_BY.labels("worker").inc()
        return recommend_body(state, req)

    async def aclose(self) -> None:
        """Stop the helper for good (the worker is stopping)."""
        process = self._process
        self._lose(restart_after_s=float("inf"))
        if process is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)

    async def _ask(self, req: RecRequest) -> Answer:
        assert self._process is not None and self._process.stdin is not None
        job = next(self._jobs)
        answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._answers[job] = answer
        try:
            self._process.stdin.write(frame((job, req)))
            return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        except TimeoutError:
            raise HelperLost(f"no answer within {ANSWER_TIMEOUT_S} s") from None
        except (ConnectionError, RuntimeError) as exc:  # its stdin closed
            raise HelperLost(str(exc)) from exc
        finally:
            self._answers.pop(job, None)

    async def _start_if_due(self) -> None:
        if self._process is not None or not self.settings.api.push_helper or time.monotonic() < self._start_after:
            return
        # The worker's import path, so the helper runs the same code (a checkout, a worktree, an install).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
            )
        except OSError as exc:  # no process to be had (memory, limits): the worker computes, and tries later
            log.warning("push helper not started (%s): lists are computed in the worker for now", exc)
            self._failed_starts += 1
            self._retry_later()
            return
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(frame((self.settings, self.settings.api.push_helper_nice)))
        self._process = process
        self._reader = asyncio.create_task(self._read_answers(process.stdout), name="push-helper-answers")

    async def _read_answers(self, stdout: asyncio.StreamReader) -> None:
        try:
            while True:
                header = await stdout.readexactly(HEADER.size)
                job, *answer = pickle.loads(await stdout.readexactly(HEADER.unpack(header)[0]))
                self._take(job, answer)
        except (asyncio.IncompleteReadError, ConnectionError):  # it died, or was stopped
            self._lose()

    def _take(self, job: int, answer: list[Any]) -> None:
        if job == READY:
            self._ready = True
            metrics.PUSH_HELPERS_READY.inc()
            log.info("push helper %s ready", answer[0])
            return
        future = self._answers.get(job)
        if future is None or future.done():  # its asker timed out
            return
        if isinstance(answer[0], Exception):
            future.set_exception(answer[0])
        else:
            future.set_result((answer[0], answer[1]))

    def _lose(self, restart_after_s: float = RESTART_AFTER_S) -> None:
        """Stop the helper (killed if still alive), fail what it was asked, start a new one later."""
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        if self._process is not None:
            if self._process.returncode is None:
                self._process.kill()
            metrics.mark_worker_exit(self._process.pid)  # its live gauges (the model version it served)
        if self._ready:
            metrics.PUSH_HELPERS_READY.dec()
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(HelperLost("the helper stopped"))
        if self._process is not None:
            self._failed_starts = 0 if self._ready else self._failed_starts + 1
        self._process, self._reader, self._ready = None, None, False
        self._retry_later(restart_after_s)

    def _retry_later(self, after_s: float = RESTART_AFTER_S) -> None:
        """No start before `after_s`, doubled for each start in a row that failed, up to MAX_RESTART_AFTER_S."""
        backoff = min(2**self._failed_starts, MAX_RESTART_AFTER_S / RESTART_AFTER_S)
        self._start_after = time.monotonic() + after_s * backoff


if __name__ == "__main__":
    main()
