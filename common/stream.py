"""The ingestion side of the event stream: append accepted events, trim by age, and read the consumers' lag.

Serving appends through `append_events`; the speed layer consumes the same stream. Each
entry holds one event as JSON under the field `e`.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from common import redis_keys
from common.events import Event

FIELD = "e"

# KEYS[1] the stream; ARGV[1] the retention in ms. Entry ids are the server's clock in ms, so
# "older than the retention" is "below now - retention" in id order. No entry a consumer group
# still needs goes: for each group, its oldest pending (delivered, unacknowledged) entry, or,
# with none pending, the last one delivered to it (everything after is undelivered). With no
# group, age alone decides. MINID ~ frees whole radix-tree nodes only: cheap, and never more.
TRIM_SCRIPT = """
local function before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end

local now = redis.call('TIME')
local bound = string.format('%d-0', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1]))
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  local needed = group['last-delivered-id']
  if group['pending'] > 0 then
    needed = redis.call('XPENDING', KEYS[1], group['name'])[2]
  end
  if before(needed, bound) then bound = needed end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', bound)
"""


def append_events(client: redis.Redis, events: Sequence[Event], stream: str, retention_ms: int) -> list[str]:
    """XADD each event, then trim what is past retention and finished by every group; one round trip."""
    if not events:
        return []
    pipe = client.pipeline(transaction=False)
    key = redis_keys.stream(stream)
    for event in events:
        pipe.xadd(key, {FIELD: event.model_dump_json(exclude_none=True)})
    # EVAL rather than a registered script: a pipeline checks SCRIPT EXISTS first, one more round trip.
    pipe.eval(TRIM_SCRIPT, 1, key, retention_ms)
    *ids, _trimmed = pipe.execute()
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


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
