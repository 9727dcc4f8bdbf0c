"""The reference algorithms of `recs evaluate replay` (evaluation/references.py): sequential rules and
session-kNN on hand-built sessions, the training sessions and per-target prefixes they are given, and
that they share no code with the product."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from common.lake import Lake
from evaluation.cli import format_table
from evaluation.protocol import Protocol, select_targets, target_prefixes, training_sessions
from evaluation.references import REFERENCES, SequentialRules, SessionKnn
from evaluation.replay import ReplayConfig, run_replay
from evaluation.strategies import DEFAULT_STRATEGIES, STRATEGIES, STRATEGY_NAMES
from tests.test_evaluate_replay import CUTOFF, SCORED, TEST_DAYS, WARMUP_DAYS, replay_settings, session_frame

# ---------------------------------------------------------------- sequential rules


def test_sr_ranks_the_item_that_follows_at_gap_one_more_often_first() -> None:
    sessions = [["a", "b"], ["a", "b"], ["a", "c"], ["a", "x", "c"], ["z", "a", "b", "c"]]
    rules = SequentialRules().fit(sessions)
    # a -> b: gap 1 three times; a -> c: gap 1 once, gap 2 twice; a -> x: gap 1 once
    assert rules.weight("a", "b") == pytest.approx(3.0)
    assert rules.weight("a", "c") == pytest.approx(1 + 0.5 + 0.5)
    assert rules.recommend(["q", "a"], 20) == ["b", "c", "x"]  # by the last item only
    assert rules.recommend(["a", "q"], 20) == []  # q is unknown: no rule, nothing listed
    assert rules.recommend(["z"], 2) == ["a", "b"]  # z -> a 1, z -> b 1/2, z -> c 1/3, cut at n


def test_sr_weights_each_pair_by_one_over_its_gap_within_steps() -> None:
    session = ["a", "p1", "b", "p2", "p3", "a", "b"]  # a -> b at gaps 2, 6 and 1 (second a); a -> a at 5
    rules = SequentialRules(steps=5).fit([session])
    assert rules.weight("a", "b") == pytest.approx(1 / 2 + 1 / 1)  # gap 6 is beyond 5 steps
    assert rules.weight("a", "a") == pytest.approx(1 / 5)  # a repeat is a rule too, as published
    assert rules.weight("b", "a") == pytest.approx(1 / 3)
    assert rules.weight("b", "p1") == 0.0  # never after b
    wider = SequentialRules(steps=10).fit([session])
    assert wider.weight("a", "b") == pytest.approx(1 / 2 + 1 / 6 + 1)
    # the last item's own repeat rule a -> a exists, but a prefix item is never listed
    assert wider.recommend(["a"], 20) == ["b", "p1", "p2", "p3"]  # b 1/2 + 1/6 + 1, p1 1, p2 1/3, p3 1/4
    assert wider.recommend(["b", "a"], 2) == ["p1", "p2"]  # b is in the prefix too; n places still filled


# ---------------------------------------------------------------- session-kNN


def test_sknn_prefers_the_items_of_the_most_similar_sessions() -> None:
    sessions = [  # oldest first
        ["a", "b", "x"],  # shares a and b with the prefix
        ["b", "y"],  # shares b (the last item)
        ["a", "z"],  # shares only a (the first, older item)
        ["q", "r"],  # shares nothing: never a neighbour
    ]
    knn = SessionKnn().fit(sessions)
    neighbours, similarity = knn.neighbours(["a", "b"])
    # weights: a (position 1 of 2) 1/2, b 1; cosine: divided by sqrt(2 prefix items * the neighbour's items)
    assert list(neighbours) == [0, 1, 2]
    assert list(similarity) == pytest.approx([1.5 / 6**0.5, 1 / 2, 0.5 / 2])
    ranked = knn.recommend(["a", "b"], 20)
    # scores: x 1.5 / sqrt(6), y 0.5, z 0.25; a and b (1.5 / sqrt(6) + 0.5, + 0.25) are the prefix's own
    assert ranked == ["x", "y", "z"]
    assert "q" not in ranked and "r" not in ranked
    assert knn.recommend(["nothing-known"], 20) == []


def test_sknn_similarity_is_a_cosine_that_discounts_large_neighbours() -> None:
    sessions = [["a", "b", "x1", "x2", "x3", "x4", "x5", "x6"], ["b", "y"]]
    knn = SessionKnn().fit(sessions)
    neighbours, similarity = knn.neighbours(["a", "b"])
    # dot products 1/2 + 1 = 1.5 and 1; the 8-item session shares more but is 4 times as large:
    # 1.5 / sqrt(2 * 8) = 0.375 < 1 / sqrt(2 * 2) = 0.5 (vsknn's `vec`, dot / 2, ranks it first: 0.75)
    assert list(neighbours) == [1, 0]
    assert list(similarity) == pytest.approx([0.5, 0.375])
    assert knn.recommend(["a", "b"], 3) == ["y", "x1", "x2"]  # y 0.5, then the x* 0.375 by id


def test_sknn_samples_the_most_recent_sessions_then_keeps_the_k_most_similar() -> None:
    sessions = [
        ["a", "b", "old"],  # the most similar to [a, b], but the oldest session that shares an item
        ["a", "mid1"],
        ["b", "mid2"],
        ["a", "new"],  # the most recent
        ["c", "unrelated"],  # more recent still, shares nothing: not a candidate
    ]
    everything = SessionKnn(k=100, sample_size=500).fit(sessions)
    assert list(everything.neighbours(["a", "b"])[0]) == [0, 2, 3, 1]  # [a, b] first; ties: the more recent
    assert everything.recommend(["a", "b"], 20).index("old") < everything.recommend(["a", "b"], 20).index("new")

    recent = SessionKnn(k=100, sample_size=3).fit(sessions)  # the 3 most recent sharing an item: 1, 2, 3
    assert sorted(recent.neighbours(["a", "b"])[0]) == [1, 2, 3]
    assert "old" not in recent.recommend(["a", "b"], 20)

    nearest = SessionKnn(k=2, sample_size=500).fit(sessions)
    assert list(nearest.neighbours(["a", "b"])[0]) == [0, 2]  # b (last, weight 1) beats a (1/2)
    assert "mid1" not in nearest.recommend(["a", "b"], 20) and "new" not in nearest.recommend(["a", "b"], 20)


def test_sknn_weights_a_repeated_prefix_item_by_its_latest_position() -> None:
    knn = SessionKnn().fit([["a", "x"], ["b", "y"]])
    # [a, b, a]: a's latest position is 3 of 3 (weight 1), b's 2 of 3; 2 distinct items, 2 per neighbour
    neighbours, similarity = knn.neighbours(["a", "b", "a"])
    assert list(neighbours) == [0, 1]
    assert list(similarity) == pytest.approx([1 / (2 * 2) ** 0.5, (2 / 3) / (2 * 2) ** 0.5])
    assert knn.recommend(["a", "b", "a"], 20) == ["x", "y"]


# ---------------------------------------------------------------- both


def test_neither_reference_lists_an_item_of_the_prefix() -> None:
    """The protocol never scores an item the session already holds: a list place spent on one is lost."""
    sessions = [["a", "b", "c", "a", "d"], ["b", "c", "d", "a"], ["c", "d", "a", "b"], ["d", "a", "b", "c"],
                ["a", "a", "e"], ["c", "f", "b"]]  # fmt: skip
    everything = {"a", "b", "c", "d", "e", "f"}
    for reference in (SequentialRules().fit(sessions), SessionKnn().fit(sessions)):
        for prefix in (["a"], ["a", "b"], ["b", "a"], ["b", "d", "a", "c"], ["a", "unknown", "c"], ["c", "c"]):
            listed = reference.recommend(prefix, 20)
            assert listed, (reference, prefix)  # each last item has a follower outside the prefix
            assert not set(listed) & set(prefix), (reference, prefix, listed)
            assert len(listed) == len(set(listed)) and set(listed) <= everything - set(prefix)
        assert reference.recommend(["a", "b", "c", "d", "e", "f"], 20) == []  # nothing left to list


# ---------------------------------------------------------------- what they are trained and asked on



def event_log() -> pd.DataFrame:
    """Sessions s* before the cutoff, t* after it, x1 across it (events 1 s apart); item:type, view by default."""
    sessions = {
        "s1": "A B C A D", "s2": "B C D A", "s3": "C D A B", "s4": "D A B C",
        "s5": "R A",  # R is rare (2 events): dropped from every session
        "t1": "A B A C:add_to_cart C:purchase D B:remove_from_cart", "t2": "N C D",
    }  # fmt: skip
    return session_frame(sessions, [])


def test_training_sessions_end_before_the_cutoff_and_keep_repeats_in_order() -> None:
    sessions = training_sessions(event_log(), CUTOFF)
    # s5 loses the rare R and is then one event long; x1 ends after the cutoff; t* start after it
    assert sessions == [list("ABCAD"), list("BCDA"), list("CDAB"), list("DABC")]


def test_each_target_is_given_exactly_the_earlier_protocol_events_of_its_session() -> None:
    events = event_log()
    test = select_targets(events, CUTOFF, {"A", "B", "C", "D"})
    prefixes = target_prefixes(events, test, CUTOFF, {"A", "B", "C", "D"})
    targets = list(zip(test.targets["session_id"], test.targets["item_id"], strict=True))
    # t1: A B A(repeat) C(cart) C(buy, repeat) D; remove_from_cart is no protocol event.
    # t2: N is rare (1 event), so dropped: C opens the session, D is a target.
    assert list(zip(targets, prefixes, strict=True)) == [
        (("t1", "B"), ["A"]),
        (("t1", "C"), ["A", "B", "A"]),
        (("t1", "D"), ["A", "B", "A", "C", "C"]),
        (("t2", "D"), ["C"]),
    ]
    repeats = Protocol(repeats=True)
    test = select_targets(events, CUTOFF, {"A", "B", "C", "D"}, repeats)
    prefixes = target_prefixes(events, test, CUTOFF, {"A", "B", "C", "D"}, repeats)
    assert [len(p) for p in prefixes] == [1, 2, 3, 4, 5, 1]  # every event past the first, in order


# ---------------------------------------------------------------- wiring


def test_a_run_of_only_the_references_replays_nothing(tmp_path: Path) -> None:
    """The batch model is still trained (the test set needs its items); no replay process starts."""
    from recs.generate import generate

    lake = tmp_path / "lake"
    generate("tiny", 11, Lake(str(lake)), end_date=datetime(2026, 11, 1).date())
    config = ReplayConfig(
        lake=str(lake), test_days=TEST_DAYS, warmup_days=WARMUP_DAYS, seed=3, strategies=("sr", "sknn")
    )
    report = run_replay(config, replay_settings(), tmp_path / "work")
    assert list(report["strategies"]) == ["sr", "sknn"] == report["reference_strategies"]
    assert report["workers"] == 0 and report["events_replayed"] == 0 and report["requests"] == 0
    for row in report["strategies"].values():
        assert set(SCORED) <= set(row)
        assert row["predictions"] == report["predictions"] > 100 and row["degraded"] == 0
        assert 0 < row["mean_list_length"] <= 20 and row["serve_ms"] >= 0
    # the planted shop: sessions co-visit related items in order, which both references must find
    assert report["strategies"]["sr"]["hr_at_20"] > 0.4 and report["strategies"]["sknn"]["hr_at_20"] > 0.4
    table = format_table(report)
    assert "\nsr " in table and "\nsknn " in table and "sr, sknn: reference algorithms" in table



def test_the_references_are_strategies_by_name_but_never_served() -> None:
    assert DEFAULT_STRATEGIES == ("popular", "batch", "batch+speed", "full", "sknn", "sr")
    assert set(REFERENCES) == {"sknn", "sr"} <= set(STRATEGY_NAMES)
    assert not set(REFERENCES) & set(STRATEGIES)  # no serving configuration: not replayed


def test_the_references_share_no_code_with_the_product() -> None:
    source = Path(__file__).parent.parent / "evaluation" / "references.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "typing", "numpy"}, imported
