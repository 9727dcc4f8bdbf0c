"""The ingest bench's bodies are what the API accepts, shaped as tracker.js sends them; its requests are whole
HTTP requests; a bench server that cannot start fails the bench at once and is not left running."""

from __future__ import annotations

import json
import os
import time

import pytest

from bench.ingest import post_request, tracker_bodies
from bench.serve import _start_server, as_request
from common.events import validate_events
from common.redis_server import free_port


def test_tracker_bodies_are_accepted_events_of_one_session_each() -> None:
    bodies = tracker_bodies(300, events_per_post=3)
    payloads = [json.loads(body) for body in bodies]
    events = [event for payload in payloads for event in payload]
    accepted, rejected = validate_events(events)
    assert rejected == [] and len(accepted) == 900
    assert len({event.event_id for event in accepted}) == 900, "no event id repeats"
    for payload in payloads:
        assert len(payload) == 3
        assert len({(event["anonymous_id"], event["session_id"]) for event in payload}) == 1


def test_a_post_request_carries_its_body_and_length() -> None:
    body = tracker_bodies(1, events_per_post=2)[0]
    head, _, sent = post_request("/v1/events", body).partition(b"\r\n\r\n")
    assert sent == body
    assert head.startswith(b"POST /v1/events HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
    assert as_request(b"raw") == b"raw"
    assert as_request("/v1/x?k=1") == b"GET /v1/x?k=1 HTTP/1.1\r\nHost: bench\r\n\r\n"


def test_a_server_that_exits_before_it_is_ready_fails_the_bench_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited"):
        _start_server("json.tool", 2, free_port(), dict(os.environ))  # not a server: it exits at once
    assert time.monotonic() - started < 30, "not after the two minutes a slow start is given"
