"""The counted speed bench: Redis under callgrind gives the same count for the same events, whichever run,
and counts what the mixes cost it (bench/instructions.py)."""

from __future__ import annotations

from bench.instructions import THIS_TREE, run_speed_instructions


def test_the_same_events_count_the_same_and_browsing_costs_redis_more_than_sessions_in_a_row() -> None:
    counted = run_speed_instructions(events=600, items=2_000, users=500, against=THIS_TREE)
    per_event = counted["redis_instructions_per_event"]
    for mix in ("in_a_row", "browsing"):
        assert per_event[mix]["this"] > 50_000  # a script call's work an event, not only its round trip
        assert abs(per_event[mix]["ratio"] - 1) < 0.01  # counted, not timed: one tree against itself
    # Browsing visitors share nothing in a call (each event another person's keys): ~25 against ~9 commands.
    assert per_event["browsing"]["this"] > 1.2 * per_event["in_a_row"]["this"]
