"""GDPR erasure of a person's speed-layer state in Redis.

Every per-person key carries the hash tag `{u:<person>}` (common/redis_keys.py), so the keys
are found with SCAN on patterns that redis_keys itself forms (its functions called with "*"),
and deleted; the person's id is glob-escaped so it matches only itself.
"""

from __future__ import annotations

import re

import redis

from common import redis_keys
from common.neighbours import session_token

_GLOB = re.compile(r"([*?\[\]\\])")


def _escaped(person_id: str) -> str:
    return _GLOB.sub(r"\\\1", person_id)


def person_key_patterns(person_id: str) -> list[str]:
    """Exact keys and SCAN patterns covering every key of the person."""
    p = _escaped(person_id)
    return [
        redis_keys.person_items(p),
        redis_keys.person_purchases(p),
        redis_keys.person_sessions(p),
        redis_keys.session_recent(p, "*"),  # also matches :cats, :cart, :counts of every session
        redis_keys.session_categories(p, "*"),
        redis_keys.session_cart(p, "*"),
        redis_keys.session_counts(p, "*"),
        redis_keys.user_delta(p, "*"),  # and the :n counters
        redis_keys.seen_events(p),
    ]


def erase_person(client: redis.Redis, person_id: str) -> int:
    """Delete every speed-layer key of the person, and the session-kNN sets of the sessions still
    known (redis_keys.neighbour_session); returns how many keys were deleted."""
    keys: set[bytes] = set()
    for pattern in person_key_patterns(person_id):
        keys.update(client.scan_iter(match=pattern, count=1000))
    keys |= {redis_keys.neighbour_session(session_token(person_id, s)).encode() for s in _sessions(keys, person_id)}
    if not keys:
        return 0
    return int(client.delete(*keys))


def _sessions(keys: set[bytes], person_id: str) -> set[str]:
    """The session ids named by the person's session-recent keys among `keys`."""
    prefix, suffix = redis_keys.template(redis_keys.session_recent, person_id)
    names = (k.decode(errors="replace") for k in keys)
    return {n[len(prefix) : len(n) - len(suffix)] for n in names if n.startswith(prefix) and n.endswith(suffix)}
