"""The synthetic storefront: deterministic for a seed, valid events, plausible funnels, planted behaviour."""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from common.events import table_to_events
from common.lake import Lake
from recs.generate import GenerateSummary, generate


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, GenerateSummary, pa.Table, pa.Table]:
    lake = Lake(str(tmp_path_factory.mktemp("gen") / "lake"))
    summary = generate("tiny", 7, lake)
    return lake, summary, lake.read_events(), lake.read_catalog()


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    generate("tiny", 3, Lake(str(tmp_path / "a")))
    generate("tiny", 3, Lake(str(tmp_path / "b")))
    generate("tiny", 4, Lake(str(tmp_path / "c")))
    a, b, c = (_file_hashes(tmp_path / n) for n in "abc")
    assert a and a == b
    assert a != c


def test_end_date_moves_the_window(tmp_path: Path) -> None:
    summary = generate("tiny", 3, Lake(str(tmp_path)), end_date=date(2025, 3, 1))
    events = Lake(str(tmp_path)).read_events(columns=["ts"])
    assert summary.start.date() == date(2025, 2, 15)
    assert pc.max(events["ts"]).as_py().date() < date(2025, 3, 1)
    assert pc.min(events["ts"]).as_py().date() >= date(2025, 2, 15)


def test_unknown_size_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        generate("huge", 1, Lake(str(tmp_path)))


def test_every_event_passes_the_schema_and_history_is_received_at_ts(tiny) -> None:
    _, summary, events, _ = tiny
    assert 4_000 <= events.num_rows <= 6_500
    assert summary.events == events.num_rows
    assert len(table_to_events(events)) == events.num_rows  # raises on any invalid event
    assert pc.all(pc.equal(events["ts"], events["received_at"])).as_py()
    assert pc.count_distinct(events["event_id"]).as_py() == events.num_rows


def test_funnel_rates_are_plausible(tiny) -> None:
    counts = Counter(tiny[2]["event_type"].to_pylist())
    assert 0.05 <= counts["add_to_cart"] / counts["view"] <= 0.15
    assert 0.20 <= counts["purchase"] / counts["add_to_cart"] <= 0.50
    for kind in ("click", "search", "wishlist", "remove_from_cart", "identify"):
        assert counts[kind] > 0, kind


def test_purchases_follow_a_cart_of_the_same_item_in_the_session(tiny) -> None:
    rows = tiny[2].select(["event_type", "session_id", "item_id", "ts"]).to_pylist()
    carts = {(r["session_id"], r["item_id"]): r["ts"] for r in rows if r["event_type"] == "add_to_cart"}
    purchases = [r for r in rows if r["event_type"] == "purchase"]
    assert purchases
    assert all(carts[(p["session_id"], p["item_id"])] < p["ts"] for p in purchases)


def test_new_items_arrive_during_the_window_and_are_never_seen_before_they_exist(tiny) -> None:
    _, summary, events, catalog = tiny
    created = dict(zip(catalog["item_id"].to_pylist(), catalog["created_at"].to_pylist(), strict=True))
    arrivals = {i for i, at in created.items() if at >= summary.start}
    assert len(arrivals) == summary.new_items > 0
    first_seen: dict[str, object] = {}
    for item, ts in zip(events["item_id"].to_pylist(), events["ts"].to_pylist(), strict=True):
        if item is not None:
            assert ts >= created[item], item
            first_seen[item] = min(first_seen.get(item, ts), ts)
    assert len(arrivals & set(first_seen)) >= len(arrivals) // 3  # arrivals get traffic too
    assert len({created[i].date() for i in arrivals}) >= 5  # spread over many days


def test_users_have_planted_tastes(tiny) -> None:
    """A known user's views concentrate on a few leaves, far beyond what popularity alone gives."""
    _, _, events, catalog = tiny
    leaf = dict(zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True))
    views = events.filter(pc.and_(pc.equal(events["event_type"], "view"), pc.is_valid(events["user_id"])))
    per_user: dict[str, Counter[str]] = {}
    for user, item in zip(views["user_id"].to_pylist(), views["item_id"].to_pylist(), strict=True):
        per_user.setdefault(user, Counter())[leaf[item]] += 1
    overall = Counter(leaf[i] for i in views["item_id"].to_pylist())
    base_share = max(overall.values()) / sum(overall.values())
    shares = [c.most_common(1)[0][1] / sum(c.values()) for c in per_user.values() if sum(c.values()) >= 10]
    assert len(shares) >= 20
    assert sum(shares) / len(shares) > 2 * base_share


def test_sessions_stay_in_a_category_and_co_visit_related_items(tiny) -> None:
    _, _, events, catalog = tiny
    leaf = dict(zip(catalog["item_id"].to_pylist(), catalog["category"].to_pylist(), strict=True))
    views = events.filter(pc.equal(events["event_type"], "view")).sort_by([("session_id", "ascending"), ("ts", "ascending")])
    sessions, items = views["session_id"].to_pylist(), views["item_id"].to_pylist()
    pairs = [(a, b) for s1, s2, a, b in zip(sessions, sessions[1:], items, items[1:], strict=False) if s1 == s2]
    same_leaf = sum(leaf[a] == leaf[b] for a, b in pairs) / len(pairs)
    assert same_leaf > 0.6  # about 1/40 if items followed each other at random


def test_some_anonymous_sessions_log_in_part_way(tiny) -> None:
    rows = tiny[2].select(["event_type", "session_id", "user_id", "anonymous_id", "ts"]).to_pylist()
    logins = {r["session_id"]: r for r in rows if r["event_type"] == "identify"}
    assert logins
    for r in rows:
        login = logins.get(r["session_id"])
        if login is not None:
            assert r["anonymous_id"] == login["anonymous_id"]
            assert (r["user_id"] is not None) == (r["ts"] >= login["ts"])
    guests = {r["session_id"] for r in rows if r["anonymous_id"].startswith("g")}
    assert guests and all(r["user_id"] is None for r in rows if r["session_id"] in guests)
