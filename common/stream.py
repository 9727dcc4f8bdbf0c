"""The ingestion side of the event stream: append accepted events, and read the consumers' lag.

Serving appends through `append_events`; the speed layer consumes the same stream. Each
entry holds one event as JSON under the field `e`.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from common import redis_keys
from common.events import Event

FIELD = "e"


def append_events(client: redis.Redis, events: Sequence[Event], stream: str, maxlen: int) -> list[str]:
    """XADD each event (approximate MAXLEN trim) in one pipeline; returns the entry ids."""
    pipe = client.pipeline(transaction=False)
    key = redis_keys.stream(stream)
    for event in events:
        pipe.xadd(key, {FIELD: event.model_dump_json(exclude_none=True)}, maxlen=maxlen, approximate=True)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """The event of one stream entry; raises ValueError (pydantic's) when malformed."""
    raw = fields.get(FIELD.encode())
    if raw is None:
        raise ValueError(f"stream entry has no {FIELD!r} field")
    return Event.model_validate_json(raw)


def group_lag(client: redis.Redis, stream: str, group: str) -> int:
    """Entries not yet delivered to the group plus those delivered but not acknowledged."""
    key = redis_keys.stream(stream)
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return 0  # no stream yet
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group:
            lag = info.get("lag")
            if lag is None:  # Redis cannot tell after trims; fall back to the stream length
                lag = client.xlen(key)
            return int(lag) + int(info.get("pending", 0))
    return int(client.xlen(key))  # group not created yet: everything is waiting
