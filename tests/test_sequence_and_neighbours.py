"""The two session rules in `common/` on hand-made sessions: ordered co-visitation (sequential rules'
1/gap) and session-kNN scoring. The speed layer's Lua side is held to them by test_gatherer_parity."""

from __future__ import annotations

import math
import random

import pytest

from common.neighbours import NeighbourIndex, score_neighbours, seed_weights
from common.sequence import SequenceCounter, heaviest, newest_first


def test_an_item_counts_for_the_items_before_it_by_one_over_the_gap() -> None:
    counter = SequenceCounter(steps=2, recent_n=20)
    for t, item in enumerate(["a", "b", "c", "d"]):
        counter.add("s1", item, float(t))
    assert dict(counter.row("a")) == {"b": 1.0, "c": 0.5}  # d is 3 steps after a: beyond steps=2
    assert dict(counter.row("c")) == {"d": 1.0}
    assert counter.row("d") == {}  # order is kept: nothing followed d


def test_a_revisit_is_not_a_new_pair_but_moves_the_item_to_the_front() -> None:
    counter = SequenceCounter(steps=10, recent_n=20)
    assert counter.add("s1", "a", 1.0) and counter.add("s1", "b", 2.0)
    assert not counter.add("s1", "a", 3.0)  # already in the session
    counter.add("s1", "c", 4.0)  # a is now the latest other item, b the one before
    assert counter.row("a")["c"] == 1.0 and counter.row("b")["c"] == 0.5
    assert counter.row("a")["b"] == 1.0  # counted once


def test_sessions_do_not_mix_and_rows_keep_their_top_n() -> None:
    counter = SequenceCounter(steps=1, recent_n=20, top_n=2)
    for n, follower in enumerate(["x", "y", "y", "z", "z", "z"]):
        counter.add(f"s{n}", "a", 0.0)
        counter.add(f"s{n}", follower, 1.0)
    assert dict(counter.top_row("a")) == {"z": 3.0, "y": 2.0}


@pytest.mark.parametrize("ties_descending", [False, True])
def test_the_heaviest_of_a_long_row_are_the_first_of_the_whole_row_so_ordered(ties_descending: bool) -> None:
    """`heaviest` partitions a long row before it sorts: the same n, in the same order, ties at the cut too."""
    rng = random.Random(7)
    for size in (3, 60, 400, 3000):
        # Few distinct weights (1/g sums), so that many members tie, at the n-th place as well.
        row = {f"i{rng.randrange(10**6)}": rng.choice([2.0, 1.5, 1.0, 0.5, 1 / 3]) for _ in range(size)}
        if ties_descending:
            whole = sorted(row.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
        else:
            whole = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))
        for n in (1, 10, 50):
            assert list(heaviest(row, n, ties_descending).items()) == whole[:n]


def test_a_rows_top_read_again_after_it_grew_is_the_top_of_its_whole_row() -> None:
    """`top_row` ranks a row read before over its last top and the followers grown since."""
    rng = random.Random(11)
    counter = SequenceCounter(steps=3, recent_n=5, top_n=4)
    items = [f"i{n}" for n in range(30)]
    for t in range(3000):
        counter.add(f"s{rng.randrange(200)}", rng.choice(items[: rng.randrange(1, 31)]), float(t))
        if rng.random() < 0.2:
            item = rng.choice(items)
            assert list(counter.top_row(item).items()) == list(heaviest(counter.row(item), 4).items())
    assert all(len(counter.top_row(item)) == 4 for item in items[:5])  # long rows were read, not just short ones


def test_newest_first_orders_as_redis_zrevrange() -> None:
    assert newest_first({"a": 2.0, "b": 3.0, "c": 2.0}) == [(3.0, "b"), (2.0, "c"), (2.0, "a")]


def test_seeds_weigh_by_position_newest_first() -> None:
    assert seed_weights({"a": 1.0, "b": 2.0, "c": 3.0}) == pytest.approx({"c": 1.0, "b": 2 / 3, "a": 1 / 3})


def test_neighbours_vote_with_their_cosine_similarity_and_never_list_the_seeds() -> None:
    index = NeighbourIndex(per_item=100, recent_n=20, ttl_s=1e9)
    for token, items in {"n1": ["a", "b", "x"], "n2": ["b", "y"], "me": ["a", "b"]}.items():
        for t, item in enumerate(items):
            index.add(token, item, float(t))
    seeds = {"a": 1.0, "b": 2.0}  # b newest: weight 1, a: 1/2
    scored = dict(score_neighbours(seeds, index.rows(seeds, 10.0), lambda t: index.session(t, 10.0), "me", 500, 100, 10))
    n1 = (1.0 + 0.5) / math.sqrt(2 * 3)
    n2 = 1.0 / math.sqrt(2 * 2)
    assert scored == pytest.approx({"x": n1, "y": n2})
    only_best = score_neighbours(seeds, index.rows(seeds, 10.0), lambda t: index.session(t, 10.0), "me", 500, 1, 10)
    assert [i for i, _ in only_best] == (["x"] if n1 > n2 else ["y"])


def test_expired_sessions_are_not_neighbours() -> None:
    index = NeighbourIndex(per_item=100, recent_n=20, ttl_s=100.0)
    index.add("old", "a", 0.0)
    index.add("old", "x", 1.0)
    assert score_neighbours({"a": 500.0}, index.rows({"a": 500.0}, 500.0), lambda t: index.session(t, 500.0), "me", 500, 100, 10) == []
