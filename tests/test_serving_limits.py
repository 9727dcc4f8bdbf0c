"""What one request may cost, through the real app under uvicorn on a free port: body size, head size, head time."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from bench.serve import SyntheticModel
from common.redis_server import free_port
from common.settings import Settings
from serving.core.limits import uvicorn_limits
from serving.main import create_app
from tests.test_serving_support import KEYS, make_settings, view_event

pytest_plugins = ["tests.test_serving_support"]

LIMIT = 64 * 1024
WAIT_S = 5.0  # far above what a refusal takes; a server waiting for the rest of a body never answers


@contextmanager
def serving(settings: Settings) -> Iterator[int]:
    """The app under uvicorn with the options `recs serve` gives it; yields the port."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", **uvicorn_limits(settings.api)
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def raw_exchange(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a head and some body bytes, never the end of the body; return all the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as conn:
        conn.sendall(head)
        for part in body_parts:
            conn.sendall(part)
        received = b""
        while chunk := conn.recv(65536):  # socket.timeout here: the server is still waiting for the body
            received += chunk
        return received


def status_and_body(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[: int(size, 16)]
    return status, json.loads(body)


def test_a_declared_oversized_body_is_refused_before_it_is_read_or_authenticated(
    published: SyntheticModel,
) -> None:
    with serving(make_settings(keys=KEYS, max_body_bytes=LIMIT)) as port:
        head = (
            b"POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (LIMIT + 1)
        )
        status, body = status_and_body(raw_exchange(port, head, []))
    assert status == 413  # not 401: nothing of the body was read, and no key was looked at
    assert body["error"] == "body_too_large" and str(LIMIT) in str(body["message"])


def test_a_chunked_body_is_cut_off_at_the_limit(published: SyntheticModel, redis_client: object) -> None:
    with serving(make_settings(max_body_bytes=LIMIT)) as port:
        head = (
            b"POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"[" + b" " * 16383  # the start of a JSON array that would never be complete
        parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (LIMIT // len(chunk) + 1)
        status, body = status_and_body(raw_exchange(port, head, parts))  # no terminating chunk sent
    assert status == 413 and body["error"] == "body_too_large"


def test_a_full_batch_fits_the_default_limit(published: SyntheticModel) -> None:
    settings = make_settings()
    batch = [view_event(f"anon-{n}", f"i{n % 50}") for n in range(settings.api.max_batch)]
    with serving(settings) as port:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=batch, timeout=30)
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == settings.api.max_batch


def test_a_slow_or_silent_head_is_cut_off(published: SyntheticModel) -> None:
    with serving(make_settings(head_timeout_s=0.5)) as port:
        silent = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        slow = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        start = time.monotonic()
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: te")  # and never the rest
        assert silent.recv(1024) == b""  # closed by the server, not by our timeout (that raises)
        assert slow.recv(1024) == b""
        assert time.monotonic() - start < WAIT_S / 2
        silent.close()
        slow.close()
        # A request whose head arrives in time is served, on a kept-alive connection twice.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/healthz").status_code == 200
            time.sleep(0.3)
            assert client.get("/healthz").status_code == 200


def test_an_oversized_head_is_refused(published: SyntheticModel) -> None:
    with serving(make_settings(max_head_bytes=8192)) as port:
        head = b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 20_000 + b"\r\n\r\n"
        status, body = status_and_body(raw_exchange(port, head, []))
        assert status == 431 and body["error"] == "head_too_large" and "8192" in str(body["message"])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/healthz", headers={"X-Padding": "a" * 4000}).status_code == 200
