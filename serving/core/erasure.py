"""GDPR erasure of a person's speed-layer state in Redis.

Every per-person key starts with the person's hash tag, which no other id can reproduce
(common/redis_keys.py), so one SCAN on redis_keys.person_keys_match finds exactly the person's keys.
"""

from __future__ import annotations

import redis

from common import redis_keys
from common.neighbours import session_token


def erase_person(client: redis.Redis, person_id: str) -> int:
    """Delete every speed-layer key of the person, and the session-kNN sets of the sessions still
    known (redis_keys.neighbour_session); returns how many keys were deleted."""
    keys = set(client.scan_iter(match=redis_keys.person_keys_match(person_id), count=1000))
    keys |= {redis_keys.neighbour_session(session_token(person_id, s)).encode() for s in _sessions(keys, person_id)}
    if not keys:
        return 0
    return int(client.delete(*keys))


def _sessions(keys: set[bytes], person_id: str) -> set[str]:
    """The session ids named by the person's session-recent keys among `keys`."""
    prefix, suffix = redis_keys.template(redis_keys.session_recent, person_id)
    names = (k.decode(errors="replace") for k in keys)
    return {n[len(prefix) : len(n) - len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)}
