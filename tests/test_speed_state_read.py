"""Serving's one-round-trip read of the speed state, on state the real speed-layer effects wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from common.events import EventType
from common.speed_state import read_speed_state
from speed_layer.effects import Applier
from tests.speed_factories import make_event, set_categories, speed_settings


def test_one_read_follows_the_latest_session_to_its_covisits_and_preferred_categories(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    redis_client, url = any_redis
    settings = speed_settings(tmp_path, url)
    set_categories(redis_client, {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "c2": "C"})
    now = datetime.now(UTC)
    shoppers = [  # other people's purchases make every category's bestsellers
        make_event(
            kind, item, anonymous_id=f"buyer-{item}", session_id=f"b-{item}", ts=now - timedelta(minutes=5)
        )
        for item in ("a1", "a2", "b1", "c1", "c2")
        for kind in (EventType.ADD_TO_CART, EventType.PURCHASE)
    ]
    mine = [  # most of the session in A, a little in B, an older session in C
        make_event(EventType.VIEW, "c1", anonymous_id="me", session_id="old", ts=now - timedelta(minutes=20)),
        make_event(EventType.VIEW, "a1", anonymous_id="me", session_id="new", ts=now - timedelta(minutes=3)),
        make_event(EventType.VIEW, "b1", anonymous_id="me", session_id="new", ts=now - timedelta(minutes=2)),
        make_event(
            EventType.ADD_TO_CART, "a2", anonymous_id="me", session_id="new", ts=now - timedelta(minutes=1)
        ),
    ]
    Applier(redis_client, settings).apply(shoppers + mine, [])

    state = read_speed_state(redis_client, "me", top_categories=2, now_s=now.timestamp())

    assert state.session_id == "new"  # none given: the latest live session
    assert set(state.session_items) == {"a1", "b1", "a2"}
    assert state.cart == {"a2": 1}
    assert set(state.covisitation) == {"a1", "b1", "a2"}  # the session's own items' co-visits
    assert state.covisitation["a1"] == {"b1": 1.0, "a2": 0.5}  # ordered: b1 next (1/1), a2 two steps on (1/2)
    assert set(state.category_bestsellers) == {"A", "B"}  # the two preferred categories, not C
    assert set(state.category_bestsellers["A"]) == {"a1", "a2"}
    assert all(0 < w < 100 for w in state.category_bestsellers["A"].values())  # decayed back to now's scale

    product_page = read_speed_state(
        redis_client, "me", session_id="new", covis_items=["c1"], categories=["C"], now_s=now.timestamp()
    )
    assert set(product_page.covisitation) == {"c1"}
    assert set(product_page.category_bestsellers) == {"C"}
