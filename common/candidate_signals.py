"""Serving's follow-up read for one request, after `speed_state.read_speed_state`: what depends on its answers.

The category bestsellers of the session's preferred categories, known only once the session's
affinity is read. One pipeline; a call with nothing to read costs no round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from common import redis_keys
from common.speed_state import forward_decay


def read_bestsellers(
    client: redis.Redis, categories: Sequence[str], now_s: float, n: int, half_life_s: float
) -> dict[str, dict[str, float]]:
    """category -> item -> bestseller weight decayed to `now_s` (speed_state's scale)."""
    if not categories or n <= 0:
        return {}
    pipe = client.pipeline(transaction=False)
    for category in categories:
        pipe.zrevrange(redis_keys.category_bestsellers(category), 0, n - 1, withscores=True)
    scale = 1.0 / forward_decay(now_s, half_life_s)
    return {
        category: {_text(m): float(s) * scale for m, s in reply}
        for category, reply in zip(categories, pipe.execute(), strict=True)
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
