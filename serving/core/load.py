"""How long a request waited for its worker, and what an overloaded worker leaves out of its answer.

A worker computes one list at a time, so a request waits for those that came before it; offered more
than the worker can answer, that wait grows without bound, and every answer comes too late. Instead, a
recommendation request that waited `api.overload_wait_ms` is answered without session-kNN (~70 % of
Redis' work on a read), and one that waited `api.overload_batch_only_wait_ms` from the batch model alone,
as without Redis: the cheaper answers drain the queue, and each says why in `degraded`. The wait counts
from when uvicorn began to parse the request (serving/core/limits.py stamps it); under the ASGI test
client, which has no such stamp, no request has waited.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import Enum
from typing import Any

from common.settings import ApiSettings

ARRIVED_AT = "recs.arrived_at"  # the ASGI scope's key: time.monotonic() when parsing of the request began


class Shed(Enum):
    """What a request's answer leaves out."""

    NOTHING = "nothing"
    NEIGHBOURS = "neighbours"
    SPEED_STATE = "speed_state"


def waited_s(scope: Mapping[str, Any]) -> float:
    """Seconds since the request's parsing began (0 without the stamp)."""
    arrived = scope.get(ARRIVED_AT)
    return 0.0 if arrived is None else time.monotonic() - arrived


def shed_for(api: ApiSettings, waited: float) -> Shed:
    """What to leave out of the answer to a request that waited `waited` seconds (a threshold of 0 is off)."""
    waited_ms = waited * 1000
    if 0 < api.overload_batch_only_wait_ms <= waited_ms:
        return Shed.SPEED_STATE
    if 0 < api.overload_wait_ms <= waited_ms:
        return Shed.NEIGHBOURS
    return Shed.NOTHING
