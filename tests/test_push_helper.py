"""The push helper: a worker's live lists computed in a niced process of its own (serving/core/push_helper.py),
the same lists as GET /v1/recommendations, and the worker computing them itself while the helper is dead
or stuck (real processes, killed and stopped for real; the real API under uvicorn, a real speed consumer)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client import REGISTRY

from bench.serve import SyntheticModel
from common.redis_server import RedisServer, free_port
from serving.core import push_helper
from serving.core.push import Fanout
from serving.core.push_helper import PushHelper
from serving.core.recommender import RecRequest
from serving.core.state import ServingState
from tests.conftest import process_gone
from tests.test_serving_push import api_and_consumer, publish, sse_messages, without_request_id
from tests.test_serving_support import make_settings, view_event

pytest_plugins = ["tests.test_serving_support"]

WAIT_S = 30.0  # a bound on waiting for what must come (a helper loads its state in seconds), never asserted
PARAMS = "anonymous_id=a1&session_id=s1&k=5"


@dataclass
class LiveApi:
    http: httpx.Client
    fanout: Fanout

    def helper_pid(self) -> int:
        """The helper's pid once it is ready to compute lists."""
        assert self.fanout.helper is not None
        wait_until(lambda: self.fanout.helper is not None and self.fanout.helper.offloads, "the helper got ready")
        pid = self.fanout.helper.pid
        assert pid is not None
        return pid


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"not so within {WAIT_S} s: {what}"
        time.sleep(0.02)


def by(where: str) -> float:
    """Pushed lists computed by `where` (helper or worker) so far, in this process."""
    return REGISTRY.get_sample_value("recs_push_helper_lists_total", {"computed_by": where}) or 0.0


def serve(api: dict[str, Any], redis_server: RedisServer) -> Iterator[LiveApi]:
    """The API (auth off, `api` settings) and a speed consumer, and an HTTP client of the API."""
    with (
        api_and_consumer(make_settings(**api), redis_server) as (host, app),
        httpx.Client(base_url=f"http://{host}", timeout=WAIT_S) as http,
    ):
        yield LiveApi(http, app.state.push)


@pytest.fixture
def helped(published: SyntheticModel, recs_env: Path, redis_server: RedisServer) -> Iterator[LiveApi]:
    yield from serve({}, redis_server)


def test_the_helper_is_a_niced_process_whose_lists_equal_a_get_and_ends_with_the_worker(
    published: SyntheticModel, recs_env: Path, redis_server: RedisServer
) -> None:
    for api in serve({}, redis_server):
        with api.http.stream("GET", f"/v1/stream/recommendations?{PARAMS}") as sse:
            events = sse_messages(sse)
            next(events)
            helper = psutil.Process(api.helper_pid())
            assert helper.ppid() == os.getpid()  # the worker's own (uvicorn runs in this process)
            assert helper.nice() == psutil.Process().nice() + make_settings().api.push_helper_nice
            in_helper, in_worker = by("helper"), by("worker")
            assert api.http.post("/v1/events", json=view_event("a1", "i5")).status_code == 202
            pushed = without_request_id(next(events))
            assert by("helper") == in_helper + 1 and by("worker") == in_worker
            got = api.http.get(f"/v1/recommendations?{PARAMS}").json()
            assert pushed == without_request_id(("recommendations", got))
            assert [item["item_id"] for item in got["items"]]  # a list, not an empty one
    # The worker stopped (the server's shutdown): its helper is gone.
    assert not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE


def test_a_killed_helper_is_replaced_and_its_list_computed_by_the_worker(
    helped: LiveApi, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    with helped.http.stream("GET", f"/v1/stream/recommendations?{PARAMS}") as sse:
        events = sse_messages(sse)
        first = without_request_id(next(events))
        pid = helped.helper_pid()
        in_worker = by("worker")
        os.kill(pid, signal.SIGKILL)
        assert helped.http.post("/v1/events", json=view_event("a1", "i5")).status_code == 202
        assert without_request_id(next(events)) != first  # the change pushed all the same
        assert by("worker") == in_worker + 1
        # A second later the next list starts a new helper, which then computes the lists.
        time.sleep(push_helper.RESTART_AFTER_S)
        publish(client, "a1", "s1")
        wait_until(lambda: helped.fanout.helper is not None and helped.fanout.helper.offloads, "a new helper is up")
        assert helped.fanout.helper is not None and helped.fanout.helper.pid not in (None, pid)
        in_helper = by("helper")
        assert helped.http.post("/v1/events", json=view_event("a1", "i6")).status_code == 202
        wait_until(lambda: by("helper") == in_helper + 1, "the new helper computed the list")
    client.close()


def test_requests_are_answered_while_the_helper_holds_a_list_then_a_stuck_one_is_killed(
    helped: LiveApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(push_helper, "ANSWER_TIMEOUT_S", 3.0)
    with helped.http.stream("GET", f"/v1/stream/recommendations?{PARAMS}") as sse:
        events = sse_messages(sse)
        first = without_request_id(next(events))
        pid = helped.helper_pid()
        helper = helped.fanout.helper
        assert helper is not None
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
        in_worker = by("worker")
        assert helped.http.post("/v1/events", json=view_event("a1", "i5")).status_code == 202
        wait_until(lambda: helper.waiting == 1, "the changed list was asked of the helper")
        # The worker answers requests while its list is out (computed in the worker, it would hold them).
        assert helped.http.get(f"/v1/recommendations?{PARAMS}").status_code == 200
        assert helper.waiting == 1 and by("worker") == in_worker
        # No answer within the timeout: the helper is killed, the worker computes the list.
        assert without_request_id(next(events)) != first
        assert by("worker") == in_worker + 1
        wait_until(lambda: process_gone(pid), "killed")


def test_without_the_helper_the_worker_computes_the_lists(
    published: SyntheticModel, recs_env: Path, redis_server: RedisServer
) -> None:
    for api in serve({"push_helper": False}, redis_server):
        in_worker, in_helper = by("worker"), by("helper")  # before the stream opens: its first list counts
        with api.http.stream("GET", f"/v1/stream/recommendations?{PARAMS}") as sse:
            events = sse_messages(sse)
            next(events)
            time.sleep(1.0)  # a helper would have been started with the first list
            assert api.http.post("/v1/events", json=view_event("a1", "i5")).status_code == 202
            next(events)
            assert by("worker") == in_worker + 2 and by("helper") == in_helper
            assert api.fanout.helper is not None and api.fanout.helper.pid is None


def test_a_helper_ends_when_its_worker_is_killed(published: SyntheticModel, recs_env: Path) -> None:
    """`recs serve` (one worker, in its own process) is SIGKILLed with a stream open: its helper, which it
    could not stop, sees its stdin close and ends."""
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", "from recs.main import app; app()", "serve", "--workers", "1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as http:
            wait_until(lambda: _answers(http), "the API answered")
            with http.stream("GET", f"/v1/stream/recommendations?{PARAMS}") as sse:
                next(sse_messages(sse))
                helpers = lambda: [  # noqa: E731
                    child for child in psutil.Process(server.pid).children()
                    if "serving.core.push_helper" in " ".join(child.cmdline())
                ]  # fmt: skip
                wait_until(lambda: len(helpers()) == 1, "the worker started its helper")
                helper = helpers()[0]
                server.kill()
                server.wait()
        wait_until(lambda: not helper.is_running() or helper.status() == psutil.STATUS_ZOMBIE, "the helper ended")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False


def test_helpers_that_die_before_they_are_ready_are_restarted_ever_later(
    published: SyntheticModel, recs_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start that keeps failing (here: each helper killed at once) must not respawn a process a second."""
    monkeypatch.setattr(push_helper, "RESTART_AFTER_S", 0.25)

    async def scenario() -> list[float]:
        settings = make_settings()
        state = ServingState.start(settings)
        helper = PushHelper(settings)
        req = RecRequest(None, "a1", "s1", 5, "home")
        gaps = []
        try:
            await helper.list_for(state, req)  # starts the first (not ready yet: the list is computed here)
            for _ in range(2):
                pid = helper.pid
                assert pid is not None and not helper.offloads
                os.kill(pid, signal.SIGKILL)
                lost_at = time.monotonic()
                while helper.pid == pid:  # until its reader sees it die
                    await asyncio.sleep(0.01)
                while helper.pid is None:  # each list asks for a new one; it starts once the delay is spent
                    await helper.list_for(state, req)
                    await asyncio.sleep(0.02)
                gaps.append(time.monotonic() - lost_at)
        finally:
            await helper.aclose()
            state.close()
        return gaps

    gaps = asyncio.run(scenario())
    assert gaps[0] >= 2 * 0.25 and gaps[1] >= 4 * 0.25  # doubled after each helper lost before it got ready


def test_a_helper_that_cannot_be_started_leaves_the_lists_to_the_worker(
    published: SyntheticModel, recs_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No process to be had (here: no interpreter at that path): the list is computed, no stream ends."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")

    async def scenario() -> tuple[int | None, int]:
        settings = make_settings()
        state = ServingState.start(settings)
        helper = PushHelper(settings)
        try:
            _, body = await helper.list_for(state, RecRequest(None, "a1", "s1", 5, "home"))
        finally:
            await helper.aclose()
            state.close()
        return helper.pid, len(json.loads(body)["items"])

    in_worker = by("worker")
    pid, items = asyncio.run(scenario())
    assert pid is None and items > 0 and by("worker") == in_worker + 1
