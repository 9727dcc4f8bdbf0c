"""The counted benches: Redis under callgrind gives the same count for the same events or requests, whichever
run, and counts what they cost it (bench/instructions.py, bench/serve_instructions.py)."""

from __future__ import annotations

from bench.instructions import THIS_TREE, run_speed_instructions
from bench.serve_instructions import run_serve_instructions


def test_the_same_events_count_the_same_and_browsing_costs_redis_more_than_sessions_in_a_row() -> None:
    counted = run_speed_instructions(events=600, items=2_000, users=500, against=THIS_TREE, consumer=True)
    per_event, in_consumer = counted["redis_instructions_per_event"], counted["consumer_instructions_per_event"]
    for mix in ("in_a_row", "browsing"):
        assert per_event[mix]["this"] > 50_000  # a script call's work an event, not only its round trip
        assert abs(per_event[mix]["ratio"] - 1) < 0.01  # counted, not timed: one tree against itself
        # The consumer's whole process from `go`: decoding, planning and packing an event's script call,
        # not only the drain's reads and acknowledgements.
        assert in_consumer[mix]["this"] > 100_000
        assert abs(in_consumer[mix]["ratio"] - 1) < 0.01
    # Browsing visitors share nothing in a call (each event another person's keys): ~25 against ~9 commands.
    assert per_event["browsing"]["this"] > 1.2 * per_event["in_a_row"]["this"]


def test_the_same_requests_count_the_same_redis_work_and_serve_the_same_lists() -> None:
    counted = run_serve_instructions(requests=40, visitors=200, items=2_000, users=1_000, against=THIS_TREE, worker=True)
    per_request, in_worker = counted["redis_instructions_per_request"], counted["worker_instructions_per_request"]
    assert per_request["this"] > 100_000  # the read script's work a request, not only its round trips
    assert abs(per_request["ratio"] - 1) < 0.01  # counted, not timed: one tree against itself
    assert in_worker["this"] > 1_000_000  # the recommender's gathering, features, ranking and rules
    assert abs(in_worker["ratio"] - 1) < 0.01
    assert counted["lists"]["identical"] == counted["lists"]["compared"] == 40
