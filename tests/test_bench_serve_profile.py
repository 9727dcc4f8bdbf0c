"""`recs bench serve --in-process --against`: what counts as the same list, and which tree runs first."""

from __future__ import annotations

import copy

from bench.serve_profile import alternating, compare_lists


def listed(*items: tuple[str, float]) -> dict:
    return {
        "model_version": "v1",
        "variant": "ranker",
        "degraded": None,
        "items": [[item, score, "trending in cat1", ["trending"], "cat1", False] for item, score in items],
    }


def test_lists_equal_up_to_the_score_tolerance_are_identical() -> None:
    ours = [listed(("a", 0.5), ("b", 0.25)), listed(("c", 1.0))]
    theirs = copy.deepcopy(ours)
    theirs[0]["items"][1][1] += 5e-7
    assert compare_lists(ours, theirs) == {"identical": 2, "compared": 2, "first_difference": None}


def test_order_scores_reasons_and_variant_each_make_a_difference() -> None:
    base = listed(("a", 0.5), ("b", 0.25))
    swapped = listed(("b", 0.25), ("a", 0.5))
    rescored = listed(("a", 0.5), ("b", 0.2501))
    reasoned = copy.deepcopy(base)
    reasoned["items"][0][2] = "because you viewed Item 3"
    other_variant = {**copy.deepcopy(base), "variant": "als_only"}
    shorter = listed(("a", 0.5))
    theirs = [swapped, rescored, reasoned, other_variant, shorter]
    result = compare_lists([base] * len(theirs), theirs)
    assert result["identical"] == 0 and result["compared"] == len(theirs)
    assert result["first_difference"] == {"request": 0, "ours": base, "theirs": swapped}


def test_each_tree_goes_first_in_every_other_round() -> None:
    trees = [("this", "/a"), ("against", "/b")]
    firsts = [alternating(trees, r)[0][0] for r in range(4)]
    assert firsts == ["this", "against", "this", "against"]
    assert sorted(alternating(trees, 1)) == sorted(trees)  # both still run
