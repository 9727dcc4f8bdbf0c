"""The speed bench's freshness mix: visitors browsing at once, which events a RecsChanged covers, and
which run it reports."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bench.speed import SESSION_EVENTS, Unheard, _event, _median_freshness, browsing_order


def test_visitors_browse_whole_sessions_at_once_each_a_person_of_its_own() -> None:
    visitors, users = 50, 400
    order = list(browsing_order(2_000, visitors))
    assert len(set(order)) == len(order)  # every event once
    sessions = Counter(n // SESSION_EVENTS for n in order)
    assert set(sessions.values()) == {SESSION_EVENTS}  # whole sessions
    events = [_event(np.random.default_rng(0), n, 1_000, users) for n in order]
    for start in range(0, len(events) - visitors + 1, visitors // 2):
        window = events[start : start + visitors]  # one event of each visitor browsing then
        assert len({e.person_id for e in window}) == visitors
    # A person's next event comes `visitors` events later, within its session, in order.
    for i, n in enumerate(order[:-visitors]):
        if n % SESSION_EVENTS != SESSION_EVENTS - 1:
            assert order[i + visitors] == n + 1


def test_a_message_covers_its_persons_events_up_to_the_one_it_names() -> None:
    unheard = Unheard()
    unheard.sent("u1", "view", "i1", 0.0)
    unheard.sent("u1", "click", "i2", 1.0)
    unheard.sent("u1", "view", "i3", 2.0)
    unheard.sent("u2", "view", "i1", 0.5)
    assert unheard.heard("u1", "purchase", "i9", 5.0) == []  # names no unheard event: covers none
    assert unheard.heard("u1", "click", "i2", 5.0) == pytest.approx([5.0, 4.0])
    assert unheard.heard("u1", "view", "i1", 6.0) == []  # heard already
    assert unheard.heard("u1", "view", "i3", 6.0) == pytest.approx([4.0])
    assert unheard.heard("u2", "view", "i1", 1.5) == pytest.approx([1.0])
    assert unheard.heard("u3", "view", "i1", 1.5) == []


def test_the_freshness_reported_is_the_run_of_the_median_p99_with_every_runs_figures() -> None:
    runs = [
        {"freshness_p50_ms": 15.0, "freshness_p99_ms": 51.6, "freshness_max_ms": 80.0},
        {"freshness_p50_ms": 18.1, "freshness_p99_ms": 23.7, "freshness_max_ms": 30.0},
        {"freshness_p50_ms": 14.9, "freshness_p99_ms": 25.9, "freshness_max_ms": 31.0},
    ]
    assert _median_freshness(runs) == {
        "freshness_p50_ms": 14.9,  # the p99's run, not the median p50 (15.0): one run's figures together
        "freshness_p99_ms": 25.9,
        "freshness_max_ms": 31.0,
        "freshness_p50_ms_runs": [14.9, 15.0, 18.1],
        "freshness_p99_ms_runs": [23.7, 25.9, 51.6],
    }
