"""The Redis keyspace: the only place key strings are formed.

The speed layer writes these keys and serving reads them. All keys of one person (user or
anonymous device) carry the hash tag `{u:<person>}`, so on Redis Cluster they live in one
slot and a Lua script may touch them together. Values that depend on a model version
(user vector deltas, fold-in vectors) carry the version in the key.
"""

from __future__ import annotations

PREFIX = "lr"

# Pub/sub channels.
MODELS_CHANNEL = f"{PREFIX}:chan:models"  # registry -> serving and speed layer (messages.ModelEvent)
CATALOG_CHANNEL = f"{PREFIX}:chan:catalog"  # item updates that must take effect at once
RECS_CHANNEL = f"{PREFIX}:chan:recs"  # speed layer -> SSE: a person's recommendations may have changed


def _person(person_id: str) -> str:
    return f"{PREFIX}:{{u:{person_id}}}"


# ---------------------------------------------------------------- streams


def stream(name: str = "events") -> str:
    return f"{PREFIX}:stream:{name}"


def dead_letter(name: str = "events") -> str:
    return f"{PREFIX}:stream:{name}:dead"


# ---------------------------------------------------------------- per person (one slot each)


def seen_event(person_id: str, event_id: str) -> str:
    """Dedup marker: the event's effects on this person were applied (with a TTL)."""
    return f"{_person(person_id)}:seen:{event_id}"


def session_recent(person_id: str, session_id: str) -> str:
    """Sorted set item -> last event time (epoch s) in the session."""
    return f"{_person(person_id)}:s:{session_id}:recent"


def session_categories(person_id: str, session_id: str) -> str:
    """Hash category -> decayed affinity, plus `_ts` the time it was last decayed."""
    return f"{_person(person_id)}:s:{session_id}:cats"


def session_cart(person_id: str, session_id: str) -> str:
    """Hash item -> quantity in the cart."""
    return f"{_person(person_id)}:s:{session_id}:cart"


def session_counts(person_id: str, session_id: str) -> str:
    """Hash event_type -> count in the session."""
    return f"{_person(person_id)}:s:{session_id}:counts"


def person_sessions(person_id: str) -> str:
    """Set of the person's live session ids (for identify-merge and erasure)."""
    return f"{_person(person_id)}:sessions"


def person_items(person_id: str) -> str:
    """Hash item -> accumulated implicit weight since the cutoff; input to the fold-in."""
    return f"{_person(person_id)}:items"


def person_purchases(person_id: str) -> str:
    """Sorted set item -> time of last purchase (epoch s), for the 'recently bought' rule."""
    return f"{_person(person_id)}:purchases"


def user_delta(person_id: str, model_version: str) -> str:
    """float32 bytes: the streaming SGD delta to the batch vector of `model_version`."""
    return f"{_person(person_id)}:delta:{model_version}"


def user_event_count(person_id: str, model_version: str) -> str:
    """How many events the delta of this version holds (for explanations and tests)."""
    return f"{_person(person_id)}:delta:{model_version}:n"


def alias(anonymous_id: str) -> str:
    """anonymous_id -> user_id once the device has logged in (identify)."""
    return f"{PREFIX}:alias:{anonymous_id}"


# ---------------------------------------------------------------- global counters


def trending_bucket(bucket_start_s: int) -> str:
    """Sorted set item -> weighted count in one time bucket."""
    return f"{PREFIX}:trend:{bucket_start_s}"


def popularity_day(day_index: int) -> str:
    """Sorted set item -> event count on one UTC day (features.day_index); kept 8 days."""
    return f"{PREFIX}:pop:{day_index}"


def category_bestsellers(category: str) -> str:
    """Sorted set item -> decayed purchase (and cart) weight within a category."""
    return f"{PREFIX}:catbest:{category}"


def covisitation(item_id: str) -> str:
    """Sorted set other item -> co-visit count within sessions, trimmed to the top N."""
    return f"{PREFIX}:covis:{item_id}"


def item_state(item_id: str) -> str:
    """Hash of the live item fields that change at once: price, in_stock, promoted, category."""
    return f"{PREFIX}:item:{item_id}"


OUT_OF_STOCK = f"{PREFIX}:items:out_of_stock"  # set of item ids, read once per request
PROMOTED = f"{PREFIX}:items:promoted"  # set of item ids

# ---------------------------------------------------------------- speed layer bookkeeping

SPEED_VERSION = f"{PREFIX}:speed:version"  # model version whose deltas the speed layer now serves
SPEED_HEARTBEAT = f"{PREFIX}:speed:heartbeat"  # hash consumer -> last beat (epoch ms)


def speed_rebuild_marker(model_version: str) -> str:
    """Set when the deltas of `model_version` have been rebuilt from its cutoff."""
    return f"{PREFIX}:speed:rebuilt:{model_version}"
