"""How long a request waited for its worker, and what an overloaded worker leaves out of its answer.

A worker computes one list at a time, so a request waits for those that came before it; offered more
than the worker can answer, that wait grows without bound, and every answer comes too late. Instead, a
recommendation request that waited `api.overload_wait_ms` is answered without session-kNN (~70 % of
Redis' work on a read), and one that waited `api.overload_batch_only_wait_ms` from the batch model alone,
as without Redis: the cheaper answers drain the queue, and each says why in `degraded`.

The wait counts from when the request reached the load balancer, where one stamps it (the
`X-Request-Start` header: nginx's `t=${msec}`, or milliseconds or microseconds since the epoch; its
clock must be this host's, to the millisecond), and from when uvicorn began to parse it
(serving/core/limits.py stamps that). A balancer that holds requests in a queue of its own, in front
of a fixed number of connections to each worker, is seen by the first only. The longer of the two
counts, so a client that sends the header itself can only make its own answer cheaper.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import Enum
from typing import Any

from common.settings import ApiSettings

ARRIVED_AT = "recs.arrived_at"  # the ASGI scope's key: time.monotonic() when parsing of the request began
REQUEST_START_HEADER = "X-Request-Start"  # the balancer's stamp (docker/nginx.conf sets it)
REQUEST_START = REQUEST_START_HEADER.lower().encode()  # as the ASGI scope holds it
# The answers' `degraded` reasons (the serve bench counts answers by them).
OVERLOAD_NO_NEIGHBOURS = "overload: no session-kNN candidates (the request waited over api.overload_wait_ms)"
OVERLOAD_BATCH_ONLY = "overload: batch-only, as without Redis (the request waited over api.overload_batch_only_wait_ms)"


class Shed(Enum):
    """What a request's answer leaves out."""

    NOTHING = "nothing"
    NEIGHBOURS = "neighbours"
    SPEED_STATE = "speed_state"

    @property
    def reason(self) -> str | None:
        """The answer's `degraded` reason; None for NOTHING."""
        return _REASONS.get(self)


_REASONS = {Shed.NEIGHBOURS: OVERLOAD_NO_NEIGHBOURS, Shed.SPEED_STATE: OVERLOAD_BATCH_ONLY}


def waited_s(scope: Mapping[str, Any]) -> float:
    """Seconds since the request reached the load balancer or since its parsing began, the longer (0
    without either): a stamp from the future does not hide the wait behind this worker's requests."""
    arrived = scope.get(ARRIVED_AT)
    waited = 0.0 if arrived is None else time.monotonic() - arrived
    for name, value in scope.get("headers", ()):
        if name == REQUEST_START:
            started = request_start_s(value)
            if started is not None:
                waited = max(waited, time.time() - started)
    return waited


def request_start(epoch_s: float) -> tuple[str, str]:
    """The header a balancer adds to a request that reached it at `epoch_s` (as nginx's `t=${msec}`)."""
    return REQUEST_START_HEADER, f"t={epoch_s:.6f}"


def request_start_s(value: bytes) -> float | None:
    """An X-Request-Start value as epoch seconds: `t=` optional, then seconds, milliseconds or microseconds
    since the epoch (told apart by their size); None when it is none of these."""
    text = value.removeprefix(b"t=")
    try:
        number = float(text)
    except ValueError:
        return None
    if not number > 0 or number == float("inf"):
        return None
    for scale in (1.0, 1e3, 1e6):
        if number / scale < 1e11:  # seconds until the year 5138
            return number / scale
    return None


def shed_for(api: ApiSettings, waited: float) -> Shed:
    """What to leave out of the answer to a request that waited `waited` seconds (a threshold of 0 is off)."""
    waited_ms = waited * 1000
    if 0 < api.overload_batch_only_wait_ms <= waited_ms:
        return Shed.SPEED_STATE
    if 0 < api.overload_wait_ms <= waited_ms:
        return Shed.NEIGHBOURS
    return Shed.NOTHING
