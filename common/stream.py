"""The event stream's entries: append accepted events, trim by age, read the consumers' lag, delete a
person's entries.

Serving appends through `append_events`; the speed layer consumes the same stream. Each
entry holds one event as JSON under the field `e`; a dead letter holds the entry's payload under
`raw` (with the reason, speed_layer/consumer.py).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import cast

import redis
from pydantic_core import to_json

from common import redis_keys
from common.events import PERSON_ID_FIELDS, Event, parse_stored_event
from common.lua import load_script
from common.redis_server import lean_pipeline

FIELD = "e"
DEAD_LETTER_FIELD = "raw"
SCAN_CHUNK = 2000  # entries per XRANGE while looking for a person's entries (a few ms of Redis each)
Entries = list[tuple[bytes, dict[bytes, bytes]]]  # as XRANGE answers (clients answer bytes)

# Trims by age, never below what a consumer group still needs (trim_stream.lua beside this file).
TRIM_STREAM = load_script("common", "trim_stream.lua")
# Removes idle members with nothing pending (remove_idle_consumers.lua beside this file).
REMOVE_IDLE_CONSUMERS = load_script("common", "remove_idle_consumers.lua")


def append_events(
    client: redis.Redis, events: Sequence[Event], stream: str, retention_ms: int, trim: bool = True
) -> list[str]:
    """XADD each event, then (with `trim`) trim what is past retention and finished by every group; one
    round trip (`lean_pipeline`: the API appends with every POST)."""
    if not events:
        return []
    key = redis_keys.stream(stream)
    commands: list[tuple[str | int, ...]] = [
        ("XADD", key, "*", FIELD, event.model_dump_json(exclude_none=True)) for event in events
    ]
    if trim:
        keys, args = TRIM_STREAM.keys.pack(stream=key), TRIM_STREAM.argv.pack(retention_ms=retention_ms)
        TRIM_STREAM.check(keys, args)
        # EVAL rather than a registered script: a pipeline checks SCRIPT EXISTS first, one more round trip.
        commands.append(("EVAL", TRIM_STREAM.source, len(keys), *keys, *args))
    ids = lean_pipeline(client, commands)[: len(events)]
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


def remove_idle_consumers(
    client: redis.Redis, stream_key: str, group: str, idle_ms: int, caller: str
) -> list[str]:
    """Remove from the group every member but `caller` idle `idle_ms` or more with no pending entry;
    returns their names."""
    keys = REMOVE_IDLE_CONSUMERS.keys.pack(stream=stream_key)
    args = REMOVE_IDLE_CONSUMERS.argv.pack(group=group, idle_ms=idle_ms, caller=caller)
    REMOVE_IDLE_CONSUMERS.check(keys, args)
    removed = cast(list[bytes], client.eval(REMOVE_IDLE_CONSUMERS.source, len(keys), *keys, *args))
    return [name.decode() if isinstance(name, bytes) else str(name) for name in removed]


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """The event of one stream entry; raises ValueError (pydantic's) when malformed."""
    raw = fields.get(FIELD.encode())
    if raw is None:
        raise ValueError(f"stream entry has no {FIELD!r} field")
    return parse_stored_event(raw)


def group_lag(client: redis.Redis, stream: str, group: str) -> int:
    """Entries not yet delivered to the group plus those delivered but not acknowledged."""
    backlog = groups_backlog(client, stream)
    if group in backlog:
        return sum(backlog[group])
    return int(client.xlen(redis_keys.stream(stream)))  # group not created yet: everything is waiting


def groups_backlog(client: redis.Redis, stream: str) -> dict[str, tuple[int, int]]:
    """Each consumer group of the stream -> (entries not yet delivered to it, delivered but not acknowledged)."""
    key = redis_keys.stream(stream)
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return {}  # no stream yet
    out = {}
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        lag = info.get("lag")
        if lag is None:  # Redis cannot tell after trims; fall back to the stream length
            lag = client.xlen(key)
        out[name] = (int(lag), int(info.get("pending", 0)))
    return out


def delete_entries_naming(client: redis.Redis, stream: str, ids: Collection[str]) -> int:
    """Delete every entry of the stream and of its dead letters whose event names one of `ids` (in a
    PERSON_ID_FIELDS field); returns how many. They are acknowledged in every group first, so no
    consumer is left holding a pending entry that no longer exists. One pass over each stream."""
    deleted = 0
    for key, field in ((redis_keys.stream(stream), FIELD), (redis_keys.dead_letter(stream), DEAD_LETTER_FIELD)):
        entry_ids = _entries_naming(client, key, field.encode(), set(ids))
        for first in range(0, len(entry_ids), SCAN_CHUNK):
            chunk = entry_ids[first : first + SCAN_CHUNK]
            for group in _groups(client, key):
                client.xack(key, group, *chunk)
            deleted += int(client.xdel(key, *chunk))
    return deleted


def _entries_naming(client: redis.Redis, key: str, field: bytes, ids: set[str]) -> list[bytes]:
    # Only payloads holding one of the ids as a JSON string are parsed: the pass costs a substring
    # search per entry. Both spellings: pydantic writes non-ASCII as is, json.dumps escapes it.
    needles = {spelling for i in ids for spelling in (to_json(i), json.dumps(i).encode())}
    found: list[bytes] = []
    start = "-"
    while True:
        entries = cast(Entries, client.xrange(key, min=start, max="+", count=SCAN_CHUNK))
        for entry_id, fields in entries:
            payload = fields.get(field)
            if payload and any(n in payload for n in needles) and _names(payload, ids):
                found.append(entry_id)
        if len(entries) < SCAN_CHUNK:
            return found
        start = "(" + entries[-1][0].decode()


def _names(payload: bytes, ids: set[str]) -> bool:
    """Whether the JSON event names one of the ids as a person (not, say, as an item)."""
    try:
        event = json.loads(payload)
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    return any(isinstance(event.get(f), str) and event[f] in ids for f in PERSON_ID_FIELDS)


def _groups(client: redis.Redis, key: str) -> list[str]:
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return []  # no such stream
    return [g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups]
