"""An overloaded worker answers late requests with cheaper lists (serving/core/load.py): what each answer
leaves out, and a real server under a burst of requests it cannot answer in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel, _keeps_up, _wait_ready, run_load
from common import redis_keys
from common.neighbours import session_token
from common.redis_server import free_port
from common.settings import ApiSettings
from serving.core.load import (
    ARRIVED_AT,
    OVERLOAD_BATCH_ONLY,
    OVERLOAD_NO_NEIGHBOURS,
    REQUEST_START,
    Shed,
    request_start,
    request_start_s,
    shed_for,
    waited_s,
)
from serving.core.recommender import RecRequest, recommend
from serving.main import create_app
from tests.test_serving_limits import status_and_body
from tests.test_serving_support import make_settings, seed_session_view, serving_state

pytest_plugins = ["tests.test_serving_support"]


@pytest.mark.parametrize(
    ("waited_ms", "shed"),
    [
        (0.0, Shed.NOTHING),
        (24.9, Shed.NOTHING),
        (25.0, Shed.NEIGHBOURS),
        (99.0, Shed.NEIGHBOURS),
        (100.0, Shed.SPEED_STATE),
    ],
)
def test_the_wait_decides_what_is_shed(waited_ms: float, shed: Shed) -> None:
    api = ApiSettings(overload_wait_ms=25, overload_batch_only_wait_ms=100)
    assert shed_for(api, waited_ms / 1000) is shed


def test_a_threshold_of_zero_never_sheds() -> None:
    assert shed_for(ApiSettings(overload_wait_ms=0, overload_batch_only_wait_ms=0), 60.0) is Shed.NOTHING
    assert shed_for(ApiSettings(overload_wait_ms=0, overload_batch_only_wait_ms=100), 0.5) is Shed.SPEED_STATE


def _session_with_a_neighbour(client: redis.Redis) -> None:
    """u1's session s1 viewed i12, which i20 often follows; another session took i12 and then i33
    (session-kNN's neighbour)."""
    seed_session_view(client, "u1", "s1", "i12", "cat4", {"i20": 5.0})
    now = redis_keys.time_score(datetime.now(UTC))
    other = session_token("u77", "s9")
    client.zadd(redis_keys.neighbour_session(other), {"i12": now, "i33": now})
    client.zadd(redis_keys.item_sessions("i12"), {other: now})


def _reads_run(client: redis.Redis) -> int:
    """Calls of the read script (and of any other script): the serving state's own threads (model listener,
    day counts, erasures) send commands of their own meanwhile, never a script."""
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "evalsha_ro", "eval"))


def test_shedding_neighbours_keeps_the_session_but_not_its_neighbours(
    client: TestClient, redis_client: redis.Redis
) -> None:
    _session_with_a_neighbour(redis_client)
    state = serving_state(client)
    req = RecRequest("u1", None, "s1", 100, "home")

    full = recommend(state, req)
    shed = recommend(state, req, shed=Shed.NEIGHBOURS)

    assert any("neighbours" in item.sources for item in full.items)
    assert full.degraded is None
    assert not any("neighbours" in item.sources for item in shed.items)
    assert shed.degraded == OVERLOAD_NO_NEIGHBOURS
    following = {item.item_id for item in shed.items if "covis" in item.sources}
    assert "i20" in following  # the session is still read: what follows its item is a candidate


def test_a_batch_only_answer_runs_no_read_of_the_speed_state(client: TestClient, redis_client: redis.Redis) -> None:
    _session_with_a_neighbour(redis_client)
    state = serving_state(client)
    req = RecRequest("u1", None, "s1", 10, "home")
    recommend(state, req)  # loads the read script, so the count below is the answer's alone

    before = _reads_run(redis_client)
    # One read a list: its three scripts, the state's, the item flags' and trending's (common/speed_state.py).
    assert recommend(state, req).degraded is None and _reads_run(redis_client) == before + 3
    result = recommend(state, req, shed=Shed.SPEED_STATE)
    assert _reads_run(redis_client) == before + 3
    assert result.degraded == OVERLOAD_BATCH_ONLY
    assert len(result.items) == 10


def _burst(port: int, n: int) -> list[tuple[int, dict[str, Any]]]:
    """n requests pipelined in one write on one connection, so the worker parses them all at once (however
    this process is scheduled) and answers them in turn; their answers, in order."""
    head = b"GET /v1/recommendations?user_id=u1&session_id=s1&k=10 HTTP/1.1\r\nHost: test\r\n"
    requests = [head + (b"Connection: close\r\n" if i == n - 1 else b"") + b"\r\n" for i in range(n)]
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(b"".join(requests))
    stream = _read_to_close(conn)
    answers = []
    for _ in range(n):
        head_end = stream.index(b"\r\n\r\n") + 4
        length = int(stream[:head_end].lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        answers.append(status_and_body(stream[: head_end + length]))
        stream = stream[head_end + length :]
    assert stream == b"", "one answer a request"
    return answers


def _read_to_close(conn: socket.socket) -> bytes:
    with conn:
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def _fallbacks(port: int, reason: str) -> float:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    text = _read_to_close(conn).partition(b"\r\n\r\n")[2].decode()
    prefix = f'recs_fallbacks_total{{reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


@contextmanager
def one_worker(recs_env: Path, **api: float) -> Iterator[int]:
    """`recs serve --workers 1` in its own process (a burst sent from this one arrives at once), with `api`
    settings from the environment; yields its port."""
    port = free_port()
    env = {**os.environ, **{f"RECS_API__{name.upper()}": str(value) for name, value in api.items()}}
    log = (recs_env / "serve.log").open("wb")  # read on failure
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--workers", "1", "--port", str(port)], env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_ready(port, process=process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _burst_of_24(recs_env: Path, redis_client: redis.Redis, **api: float) -> tuple[list[dict[str, Any]], float]:
    """24 requests at once to one worker with `api` settings: their bodies (each answered 200) and how
    many lists the worker counted as shed without session-kNN."""
    _session_with_a_neighbour(redis_client)
    with one_worker(recs_env, **api) as port:
        answers = _burst(port, 24)
        counted = _fallbacks(port, "overload_neighbours")
    assert [status for status, _ in answers] == [200] * 24
    return [body for _, body in answers], counted


def test_requests_that_waited_behind_a_burst_get_cheaper_lists_not_errors(
    published: SyntheticModel, recs_env: Path, redis_client: redis.Redis
) -> None:
    # Each list takes the worker over a millisecond: of 24 sent at once, those answered after the first
    # few wait past 1 ms (how many depends on how fast this process sends them).
    bodies, counted = _burst_of_24(recs_env, redis_client, overload_wait_ms=1, overload_batch_only_wait_ms=0)
    degraded = [body["degraded"] for body in bodies]
    assert degraded.count(OVERLOAD_NO_NEIGHBOURS) >= 3
    assert set(degraded) <= {None, OVERLOAD_NO_NEIGHBOURS}
    assert counted == degraded.count(OVERLOAD_NO_NEIGHBOURS)
    assert all(len(body["items"]) == 10 for body in bodies)


def test_without_thresholds_a_burst_waits_and_every_list_is_whole(
    published: SyntheticModel, recs_env: Path, redis_client: redis.Redis
) -> None:
    bodies, counted = _burst_of_24(recs_env, redis_client, overload_wait_ms=0, overload_batch_only_wait_ms=0)
    assert {body["degraded"] for body in bodies} == {None} and counted == 0
    assert len({json.dumps(body["items"]) for body in bodies}) == 1  # the same state, the same list


def test_the_serve_bench_counts_what_was_shed() -> None:
    held = {"p99_ms": 20.0, "errors": 0, "rps": 100.0, "shed": {"neighbours": 0.005, "batch_only": 0.0}}
    assert _keeps_up({**held, "slow_or_shed": 0.01}, 100)
    # Shed answers count as slow ones: a rate held only by shedding 2 % of its answers is not held.
    assert not _keeps_up({**held, "shed": {"neighbours": 0.02, "batch_only": 0.0}, "slow_or_shed": 0.02}, 100)


def test_the_serve_bench_load_sees_an_overloaded_worker_shed(
    published: SyntheticModel, recs_env: Path, redis_client: redis.Redis
) -> None:
    _session_with_a_neighbour(redis_client)
    path = "/v1/recommendations?user_id=u1&session_id=s1&k=10"
    with one_worker(recs_env, overload_wait_ms=1, overload_batch_only_wait_ms=0) as port:
        step = run_load(port, 2000, 1, [path])  # ~3 times what one worker answers: requests queue
    assert step["errors"] == 0
    assert step["shed"]["neighbours"] > 0.5 and step["shed"]["batch_only"] == 0
    assert step["slow_or_shed"] >= step["shed"]["neighbours"]
    assert not _keeps_up(step, 2000)


@pytest.mark.parametrize(
    ("value", "epoch_s"),
    [
        (b"t=1733339999.5", 1733339999.5),  # nginx: t=${msec}
        (b"1733339999500", 1733339999.5),  # milliseconds
        (b"t=1733339999500000", 1733339999.5),  # microseconds
        (b"soon", None),
        (b"t=-3", None),
        (b"nan", None),
    ],
)
def test_the_balancers_request_start_is_read_in_any_of_its_units(value: bytes, epoch_s: float | None) -> None:
    assert request_start_s(value) == epoch_s


def test_the_wait_at_the_load_balancer_decides_what_is_shed(published: SyntheticModel, redis_client: redis.Redis) -> None:
    _session_with_a_neighbour(redis_client)
    params = {"user_id": "u1", "session_id": "s1", "k": 10}
    # Thresholds far apart, so a slow test machine's own delay cannot move an answer across one.
    settings = make_settings(overload_wait_ms=500, overload_batch_only_wait_ms=30_000)
    with TestClient(create_app(settings)) as client:

        def degraded(waited_s: float | None) -> object:
            headers = {} if waited_s is None else dict([request_start(time.time() - waited_s)])
            response = client.get("/v1/recommendations", params=params, headers=headers)
            assert response.status_code == 200 and len(response.json()["items"]) == 10
            return response.json()["degraded"]

        assert degraded(None) is None
        assert degraded(0.0) is None
        assert degraded(5.0) == OVERLOAD_NO_NEIGHBOURS
        assert degraded(300.0) == OVERLOAD_BATCH_ONLY


def test_the_longer_of_the_balancers_and_the_workers_waits_counts() -> None:
    def scope(header_age_s: float, parse_age_s: float) -> dict[str, Any]:
        stamp = f"t={time.time() - header_age_s:.6f}".encode()
        return {"headers": [(b"host", b"x"), (REQUEST_START, stamp)], ARRIVED_AT: time.monotonic() - parse_age_s}

    assert waited_s(scope(1.0, 0.2)) == pytest.approx(1.0, abs=0.05)  # queued at the balancer
    assert waited_s(scope(-60.0, 0.2)) == pytest.approx(0.2, abs=0.05)  # a stamp from the future hides nothing
    assert waited_s({"headers": []}) == 0.0  # neither (the ASGI test client's requests)
