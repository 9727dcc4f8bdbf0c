"""Serving's one-round-trip read of the speed state, on state the real speed-layer effects wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import redis

from common import redis_keys
from common.events import Event, EventType
from common.features import POP_DAYS, day_index
from common.neighbours import score_neighbours, session_token
from common.speed_state import NeighbourQuery, read_speed_state
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


def _scored_from_the_index(
    client: Any, person: str, session: str, query: NeighbourQuery
) -> list[tuple[str, float]]:
    """common/neighbours.py's scoring of the index as Redis holds it (rows read with their times)."""
    recent = {
        m.decode(): t
        for m, t in client.zrange(redis_keys.session_recent(person, session), 0, -1, withscores=True)
    }
    rows = {
        seed: {
            t.decode(): at
            for t, at in client.zrevrange(
                redis_keys.item_sessions(seed), 0, query.per_item - 1, withscores=True
            )
        }
        for seed in recent
    }

    def members(token: str) -> dict[str, float]:
        return dict.fromkeys(
            (m.decode() for m in client.zrange(redis_keys.neighbour_session(token), 0, -1)), 0.0
        )

    own = session_token(person, session)
    return score_neighbours(recent, rows, members, own, query.sample, query.k, query.n)


def test_session_neighbours_are_the_scored_index_whether_the_sample_cuts_the_candidates_or_not(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    redis_client, url = any_redis
    settings = speed_settings(tmp_path, url)
    now = datetime.now(UTC)

    def view(item: str, who: str, minutes_ago: int) -> Event:
        return make_event(
            EventType.VIEW,
            item,
            anonymous_id=who,
            session_id=f"s-{who}",
            ts=now - timedelta(minutes=minutes_ago),
        )

    # Seen first under the newest seed y, B then A; but C, under the older seed x, is the latest of all:
    # a sample of one must take C, which only the candidates' times tell.
    events = [
        view("x", "me", 30), view("y", "me", 29),
        view("y", "A", 20), view("a1", "A", 19),
        view("y", "B", 15), view("b1", "B", 14),
        view("x", "C", 10), view("c1", "C", 9),
    ]  # fmt: skip
    Applier(redis_client, settings).apply(events, [])

    for sample, expected in ((1, {"c1"}), (3, {"a1", "b1", "c1"}), (50, {"a1", "b1", "c1"})):
        query = NeighbourQuery(sample=sample, k=10, n=10, per_item=10)
        state = read_speed_state(
            redis_client, "me", session_id="s-me", neighbours=query, now_s=now.timestamp()
        )
        assert {item for item, _ in state.neighbours} == expected, sample
        assert state.neighbours == _scored_from_the_index(redis_client, "me", "s-me", query), sample


def test_session_neighbours_are_the_scored_index_when_every_cut_falls_among_ties(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """Many sessions over few items, their views at a few shared minutes: candidates tie in time, sessions
    in similarity (same items) and items in score, so each cut (sample, k, n) falls inside a tie that
    only the ids break."""
    redis_client, url = any_redis
    settings = speed_settings(tmp_path, url)
    now = datetime.now(UTC)
    rng = np.random.default_rng(7)
    items = [f"i{j:02d}" for j in range(24)]
    events = []
    for v in range(120):
        viewed = rng.choice(items, int(rng.integers(1, 7)), replace=False)
        minutes = rng.integers(5, 9, len(viewed))
        events += [
            make_event(EventType.VIEW, str(item), anonymous_id=f"v{v}", session_id=f"s{v}", ts=now - timedelta(minutes=int(m)))
            for item, m in zip(viewed, minutes, strict=True)
        ]  # fmt: skip
    events += [
        make_event(EventType.VIEW, item, anonymous_id="me", session_id="s-me", ts=now - timedelta(minutes=4 - j))
        for j, item in enumerate(items[:4])
    ]
    Applier(redis_client, settings).apply(events, [])

    lists = []
    for sample, k, n in ((500, 100, 50), (40, 10, 5), (25, 3, 2), (7, 7, 30), (1, 1, 1)):
        query = NeighbourQuery(sample=sample, k=k, n=n, per_item=100)
        state = read_speed_state(redis_client, "me", session_id="s-me", neighbours=query, now_s=now.timestamp())
        expected = _scored_from_the_index(redis_client, "me", "s-me", query)
        assert state.neighbours == expected, (sample, k, n)
        lists.append(expected)
    assert [len(scored) for scored in lists[:2]] == [len(items) - 4, 5]  # every other item uncut; n's cut
    assert len({score for _, score in lists[3]}) < len(lists[3])  # items tie in score: ids order them


def test_a_redis_that_forgot_the_read_script_is_given_it_again(redis_client: redis.Redis) -> None:
    now_s = datetime.now(UTC).timestamp()
    redis_client.zadd(redis_keys.person_sessions("me"), {"s1": now_s})
    redis_client.zadd(redis_keys.popularity_day(day_index(now_s)), {"i1": 2.0})
    for candidates in ([], ["i1"]):  # the script alone, and in a pipeline with the day counts
        redis_client.script_flush()
        state = read_speed_state(redis_client, "me", candidate_items=candidates, now_s=now_s)
        assert state.session_id == "s1"
        assert state.day_counts.shape == (len(candidates), POP_DAYS)
    assert state.day_counts[0, -1] == 2.0  # today's count, the last of the days read
