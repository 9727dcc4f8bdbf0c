"""The warehouse views on a small hand-made lake whose every figure is worked out below."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from scipy.stats import binomtest, norm

from common.catalog import Item, items_to_table
from common.events import Event, EventType, deterministic_event_id, events_to_table
from common.lake import IMPRESSION_SCHEMA, Lake
from common.registry import Manifest, Registry
from warehouse.build import build_warehouse

D1, D2, D3 = date(2024, 3, 4), date(2024, 3, 5), date(2024, 3, 6)
OLD_DAY = date(2024, 2, 27)


def at(day: date, hh: int, mm: int) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, tzinfo=UTC)


# Who is who: (user_id, anonymous_id, device, country).
ALICE = ("u_alice", "a_alice", "mobile", "DE")
BOB = (None, "a_bob", "desktop", "FR")
CAROL = ("u_carol", "a_carol", "desktop", "DE")
DAVE = (None, "a_dave", None, "US")  # no device: the funnel files him under "unknown"

# (who, when, type, item, extra fields). Sessions and attributions are spelled out in the tests.
EVENTS: list[tuple[tuple[Any, ...], datetime, EventType, str | None, dict[str, Any]]] = [
    (DAVE, at(OLD_DAY, 9, 0), EventType.VIEW, "i1", {}),
    # Alice, session A1: clicks i2 in list r1 (click, then the product page view carrying it too).
    (ALICE, at(D1, 10, 0), EventType.VIEW, "i1", {}),
    (ALICE, at(D1, 10, 10), EventType.CLICK, "i2", {"rec_request_id": "r1"}),
    (ALICE, at(D1, 10, 12), EventType.VIEW, "i2", {"rec_request_id": "r1"}),
    (ALICE, at(D1, 10, 20), EventType.ADD_TO_CART, "i2", {"price": 10.0, "quantity": 2}),
    (ALICE, at(D1, 10, 40), EventType.PURCHASE, "i2", {"price": 10.0, "quantity": 2}),
    # A2: 31 minutes after A1's last event -> new session; the next view is exactly 30 min later -> same.
    (ALICE, at(D1, 11, 11), EventType.VIEW, "i3", {}),
    (ALICE, at(D1, 11, 41), EventType.VIEW, "i4", {}),
    # Bob, B1: clicks i3 in r2, buys it (no quantity: counts as 1).
    (BOB, at(D1, 12, 1), EventType.CLICK, "i3", {"rec_request_id": "r2"}),
    (BOB, at(D1, 12, 5), EventType.ADD_TO_CART, "i3", {"price": 7.5}),
    (BOB, at(D1, 12, 6), EventType.PURCHASE, "i3", {"price": 7.5}),
    # Carol, C1: a search, a click (as a view) on i4 in r3, a click on i9 that r3 never showed.
    (CAROL, at(D2, 7, 59), EventType.SEARCH, None, {"query": "shoes"}),
    (CAROL, at(D2, 8, 1), EventType.VIEW, "i4", {"rec_request_id": "r3"}),
    (CAROL, at(D2, 8, 2), EventType.VIEW, "i2", {}),
    (CAROL, at(D2, 8, 3), EventType.CLICK, "i9", {"rec_request_id": "r3"}),
    (CAROL, at(D2, 8, 30), EventType.ADD_TO_CART, "i4", {"price": 3.0}),
    # Dave, D1.
    (DAVE, at(D2, 9, 10), EventType.VIEW, "i1", {}),
    # Alice, A3: clicks i1 and i2 in r5. The i2 purchase is within 24 h of her r1 click too;
    # the later r5 click takes it (last click).
    (ALICE, at(D2, 9, 31), EventType.CLICK, "i1", {"rec_request_id": "r5"}),
    (ALICE, at(D2, 9, 33), EventType.CLICK, "i2", {"rec_request_id": "r5"}),
    (ALICE, at(D2, 9, 35), EventType.ADD_TO_CART, "i1", {"price": 5.0}),
    (ALICE, at(D2, 9, 40), EventType.PURCHASE, "i2", {"price": 10.0, "quantity": 1}),
    # A4: buys i1 24 h 1 min after clicking it: outside the window, not attributed.
    (ALICE, at(D3, 9, 32), EventType.PURCHASE, "i1", {"price": 5.0, "quantity": 1}),
]

# (request_id, served_at, person, variant, model_version, context, items)
IMPRESSIONS = [
    ("r1", at(D1, 9, 59), "u_alice", "ranker", "v2", "home", ["i2", "i3", "i4"]),
    ("r2", at(D1, 12, 0), "a_bob", "popular", None, "pdp", ["i3", "i2"]),
    ("r3", at(D2, 8, 0), "u_carol", "ranker", "v2", "home", ["i4", "i2", "i3"]),
    ("r4", at(D2, 9, 0), "a_dave", "popular", None, "home", ["i1", "i4"]),
    ("r5", at(D2, 9, 30), "u_alice", "ranker", "v2", "home", ["i2", "i1"]),
    ("r6", at(D2, 10, 0), "u_carol", "ranker", "v2", "home", ["i1"]),
    ("r7", at(D2, 10, 0), "a_bob", "popular", None, "home", ["i4"]),
]


def make_events() -> pa.Table:
    events = []
    for n, ((user_id, anonymous_id, device, country), ts, kind, item, extra) in enumerate(EVENTS):
        event = Event(
            event_id=deterministic_event_id("wh-test", n),
            event_type=kind,
            ts=ts,
            anonymous_id=anonymous_id,
            user_id=user_id,
            item_id=item,
            context={"device": device, "country": country},
            **extra,
        )
        events.append(event.received(ts + timedelta(seconds=1)))
    return events_to_table(events)


def make_impressions() -> pa.Table:
    rows = [
        {
            "request_id": request_id,
            "served_at": served_at,
            "person_id": person,
            "variant": variant,
            "model_version": model_version,
            "context": context,
            "items": items,
            "scores": [1.0 / (k + 1) for k in range(len(items))],
            "sources": ["als"] * len(items),
        }
        for request_id, served_at, person, variant, model_version, context, items in IMPRESSIONS
    ]
    return pa.Table.from_pylist(rows, schema=IMPRESSION_SCHEMA)


def make_lake(root: Path) -> Lake:
    lake = Lake(str(root))
    lake.write_events(make_events())
    lake.write_impressions(make_impressions())
    old = [Item(item_id="i1", title="Old socks", category_path=["Clothes", "Socks"], price=4.0)]
    lake.write_catalog(items_to_table(old), at=at(D1, 0, 0))
    items = [
        Item(item_id="i1", title="Socks", category_path=["Clothes", "Socks"], price=5.0),
        Item(item_id="i2", title="Shirt", category_path=["Clothes", "Shirts"], price=10.0),
        Item(item_id="i3", title="Mug", category_path=["Home", "Mugs"], price=7.5),
        Item(item_id="i4", title="Cap", category_path=["Clothes", "Caps"], price=3.0),
    ]
    lake.write_catalog(items_to_table(items), at=at(D2, 0, 0))
    return lake


def make_registry(root: Path) -> Registry:
    registry = Registry(str(root))
    metrics_v1 = {"popular": {"ndcg_at_20": 0.10, "recall_at_20": 0.20}, "als": {"ndcg_at_20": 0.15}}
    metrics_v2 = {"popular": {"ndcg_at_20": 0.10}, "als_ranker": {"ndcg_at_20": 0.12, "coverage": 0.4}}
    for version, created, metrics in (("v1", at(D1, 2, 0), metrics_v1), ("v2", at(D2, 2, 0), metrics_v2)):
        registry.write_manifest(
            Manifest(version=version, created_at=created, cutoff=created, engine="implicit", metrics=metrics)
        )
    registry.activate("v1", kind="published")
    registry.reject("v2", "ndcg_at_20 fell 20% against v1")
    return registry


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wh")
    make_lake(root / "lake")
    make_registry(root / "models")
    return build_warehouse(root / "warehouse.duckdb", str(root / "lake"), str(root / "models"), "popular")


@pytest.fixture
def con(warehouse: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(warehouse), read_only=True)
    yield connection
    connection.close()


def rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def pick(row: dict[str, Any], *names: str) -> tuple[Any, ...]:
    return tuple(row[name] for name in names)


def test_events_view_flattens_context_and_resolves_person(con: duckdb.DuckDBPyConnection) -> None:
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == len(EVENTS)
    bob = rows(con, "SELECT person_id, device, country, dt FROM events WHERE anonymous_id = 'a_bob'")[0]
    assert bob == {"person_id": "a_bob", "device": "desktop", "country": "FR", "dt": D1}
    assert con.execute("SELECT DISTINCT person_id FROM events WHERE anonymous_id = 'a_alice'").fetchall() == [
        ("u_alice",)
    ]


def test_catalog_is_the_newest_snapshot(con: duckdb.DuckDBPyConnection) -> None:
    catalog = rows(con, "SELECT item_id, title, category FROM catalog ORDER BY item_id")
    assert len(catalog) == 4
    assert catalog[0] == {"item_id": "i1", "title": "Socks", "category": "Socks"}


def test_sessions_split_after_more_than_30_minutes(con: duckdb.DuckDBPyConnection) -> None:
    sessions = rows(
        con,
        "SELECT person_id, started_at, ended_at, events, views, add_to_carts, purchases, revenue, device "
        "FROM sessions ORDER BY person_id, started_at",
    )
    alice = [s for s in sessions if s["person_id"] == "u_alice"]
    assert [(s["started_at"], s["ended_at"]) for s in alice] == [
        (at(D1, 10, 0), at(D1, 10, 40)),  # 20-minute gap inside: one session
        (at(D1, 11, 11), at(D1, 11, 41)),  # opened by a 31-minute gap; a gap of exactly 30 stays in
        (at(D2, 9, 31), at(D2, 9, 40)),
        (at(D3, 9, 32), at(D3, 9, 32)),
    ]
    assert [(s["events"], s["views"], s["add_to_carts"], s["purchases"], s["revenue"]) for s in alice] == [
        (5, 2, 1, 1, 20.0),
        (2, 2, 0, 0, 0.0),
        (4, 0, 1, 1, 10.0),
        (1, 0, 0, 1, 5.0),
    ]
    assert len(sessions) == 8
    assert {s["person_id"] for s in sessions} == {"u_alice", "a_bob", "u_carol", "a_dave"}


def test_daily_kpis(con: duckdb.DuckDBPyConnection) -> None:
    kpis = {r["day"]: r for r in rows(con, "SELECT * FROM daily_kpis")}
    assert list(kpis) == [OLD_DAY, D1, D2, D3]
    d1 = kpis[D1]
    assert pick(d1, "active_users", "sessions", "views", "add_to_carts", "purchases") == (2, 3, 4, 2, 2)
    assert d1["orders"] == 2
    assert d1["add_to_cart_rate"] == pytest.approx(2 / 3)
    assert d1["conversion_rate"] == pytest.approx(2 / 3)
    assert d1["revenue"] == pytest.approx(27.5)
    assert d1["aov"] == pytest.approx(13.75)
    d2 = kpis[D2]
    assert (d2["active_users"], d2["sessions"], d2["views"], d2["orders"]) == (3, 3, 3, 1)
    assert d2["add_to_cart_rate"] == pytest.approx(2 / 3)
    assert d2["conversion_rate"] == pytest.approx(1 / 3)
    assert (d2["revenue"], d2["aov"]) == (pytest.approx(10.0), pytest.approx(10.0))
    assert pick(kpis[D3], "conversion_rate", "revenue", "aov") == (1.0, 5.0, 5.0)
    assert pick(kpis[OLD_DAY], "conversion_rate", "revenue", "aov") == (0.0, 0.0, None)


def test_funnel_by_day_device_country(con: duckdb.DuckDBPyConnection) -> None:
    funnel = {
        (r["day"], r["device"], r["country"]): (r["sessions"], r["viewed"], r["carted"], r["purchased"])
        for r in rows(con, "SELECT * FROM funnel")
    }
    assert funnel == {
        (OLD_DAY, "unknown", "US"): (1, 1, 0, 0),
        (D1, "mobile", "DE"): (2, 2, 1, 1),
        (D1, "desktop", "FR"): (1, 1, 1, 1),  # Bob never logged a view: reaching the cart implies it
        (D2, "mobile", "DE"): (1, 1, 1, 1),
        (D2, "desktop", "DE"): (1, 1, 1, 0),
        (D2, "unknown", "US"): (1, 1, 0, 0),
        (D3, "mobile", "DE"): (1, 1, 1, 1),
    }
    d1 = rows(con, "SELECT * FROM funnel WHERE day = DATE '2024-03-04' AND device = 'mobile'")[0]
    assert (d1["view_to_cart"], d1["cart_to_purchase"], d1["view_to_purchase"]) == (0.5, 1.0, 0.5)


def test_item_stats(con: duckdb.DuckDBPyConnection) -> None:
    stats = {r["item_id"]: r for r in rows(con, "SELECT * FROM item_stats")}
    i1, i2 = stats["i1"], stats["i2"]
    assert pick(i1, "title", "views", "add_to_carts", "purchases", "revenue") == ("Socks", 3, 1, 1, 5.0)
    assert i1["conversion"] == pytest.approx(1 / 3)
    # Newest event: D3 09:32. Dave's old view falls in the 7 days before the last 7: 2 vs 1 views.
    assert (i1["views_last_7d"], i1["views_prior_7d"], i1["trend"]) == (2, 1, pytest.approx(1.0))
    assert pick(i2, "views", "purchases", "units", "revenue", "conversion") == (2, 2, 3, 30.0, 1.0)
    assert i2["trend"] is None
    assert stats["i9"]["title"] is None and stats["i9"]["views"] == 0


def test_recommendation_items_attribution(con: duckdb.DuckDBPyConnection) -> None:
    clicked = rows(
        con,
        "SELECT request_id, item_id, position, attributed_add_to_carts AS carts, "
        "attributed_purchases AS buys, attributed_revenue AS revenue "
        "FROM recommendation_items WHERE clicked ORDER BY request_id, position",
    )
    assert [tuple(r.values()) for r in clicked] == [
        ("r1", "i2", 1, 1, 1, 20.0),  # the D2 purchase of i2 goes to the later r5 click
        ("r2", "i3", 1, 1, 1, 7.5),
        ("r3", "i4", 1, 1, 0, 0.0),  # the click on i9 is not in r3 and is ignored
        ("r5", "i2", 1, 0, 1, 10.0),
        ("r5", "i1", 2, 1, 0, 0.0),  # bought 24 h 1 min after the click: outside the window
    ]
    assert con.execute("SELECT count(*) FROM recommendation_items").fetchone()[0] == 14


def test_recommendation_performance(con: duckdb.DuckDBPyConnection) -> None:
    by_variant = rows(
        con,
        "SELECT variant, sum(impressions) AS impressions, sum(clicks) AS clicks, "
        "sum(clicks) / sum(impressions) AS ctr, sum(attributed_add_to_carts) AS carts, "
        "sum(attributed_purchases) AS buys, sum(attributed_revenue) AS revenue "
        "FROM recommendation_performance GROUP BY variant ORDER BY variant",
    )
    assert [tuple(r.values()) for r in by_variant] == [
        ("popular", 5, 1, 0.2, 1, 1, 7.5),
        ("ranker", 9, 4, 4 / 9, 3, 2, 30.0),
    ]
    row = rows(
        con,
        "SELECT * FROM recommendation_performance WHERE day = DATE '2024-03-05' AND variant = 'ranker' "
        "AND context = 'home' AND position = 2",
    )[0]
    # Position 2 on D2 in the ranker: r3's i2 (no click) and r5's i1 (clicked, carted).
    assert (row["model_version"], row["impressions"], row["clicks"], row["ctr"]) == ("v2", 2, 1, 0.5)
    assert row["attributed_add_to_carts"] == 1
    popular_versions = (
        "SELECT DISTINCT model_version FROM recommendation_performance WHERE variant = 'popular'"
    )
    assert rows(con, popular_versions) == [{"model_version": "none"}]


def test_bandit_arms_sum_each_arms_posteriors_over_days(con: duckdb.DuckDBPyConnection) -> None:
    got = rows(
        con,
        "SELECT day, context, arm, lists, clicked_lists, purchase_lists, share, click_alpha, click_beta, "
        "purchase_alpha, purchase_beta FROM bandit_arms",
    )
    assert [tuple(r.values()) for r in got] == [
        # r1: Alice clicks at 10:10 and buys at 10:40 (the purchase reward); r2: Bob clicks and buys.
        (D1, "home", "ranker", 1, 1, 1, 1.0, 2.0, 1.0, 2.0, 1.0),
        (D1, "pdp", "popular", 1, 1, 1, 1.0, 2.0, 1.0, 2.0, 1.0),
        (D2, "home", "popular", 2, 0, 0, 0.4, 1.0, 3.0, 1.0, 3.0),  # r4, r7: no click
        # r3 (Carol clicks, buys nothing), r5 (Alice clicks, buys at 9:40), r6; summed with D1's r1.
        (D2, "home", "ranker", 3, 2, 1, 0.6, 4.0, 2.0, 3.0, 3.0),
    ]
    means = rows(con, "SELECT click_mean FROM bandit_arms WHERE day = DATE '2024-03-05' AND arm = 'ranker'")
    assert means == [{"click_mean": 4 / 6}]


def test_model_runs(con: duckdb.DuckDBPyConnection) -> None:
    runs = rows(con, "SELECT version, status, decision, is_current, strategy, metric, value FROM model_runs")
    assert len(runs) == 6
    assert {(r["version"], r["status"], r["is_current"]) for r in runs} == {
        ("v1", "published", True),
        ("v2", "rejected", False),
    }
    assert {r["decision"] for r in runs if r["version"] == "v2"} == {"ndcg_at_20 fell 20% against v1"}
    values = {(r["version"], r["strategy"], r["metric"]): r["value"] for r in runs}
    assert values[("v1", "als", "ndcg_at_20")] == 0.15
    assert values[("v2", "als_ranker", "coverage")] == 0.4


def wilson(k: int, n: int) -> tuple[float, float]:
    interval = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return interval.low, interval.high


def diff_interval(k1: int, n1: int, k0: int, n0: int) -> tuple[float, float]:
    p1, p0 = k1 / n1, k0 / n0
    half = norm.ppf(0.975) * math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    return p1 - p0 - half, p1 - p0 + half


def test_experiment_results_against_reference(con: duckdb.DuckDBPyConnection) -> None:
    results = {r["variant"]: r for r in rows(con, "SELECT * FROM experiment_results")}
    ranker, popular = results["ranker"], results["popular"]
    # ranker: lists r1 r3 r5 r6, clicked r1 r3 r5; users Alice (bought via r1, r5) and Carol.
    assert pick(ranker, "lists", "clicked_lists", "users", "converted_users") == (4, 3, 2, 1)
    # popular (control): lists r2 r4 r7, clicked r2; users Bob (bought via r2) and Dave.
    assert pick(popular, "lists", "clicked_lists", "users", "converted_users") == (3, 1, 2, 1)
    assert popular["is_control"] and not ranker["is_control"]
    for row, (k, n), (ku, nu) in ((ranker, (3, 4), (1, 2)), (popular, (1, 3), (1, 2))):
        assert row["ctr"] == pytest.approx(k / n)
        assert (row["ctr_low"], row["ctr_high"]) == pytest.approx(wilson(k, n), abs=1e-12)
        assert (row["conversion_low"], row["conversion_high"]) == pytest.approx(wilson(ku, nu), abs=1e-12)
    assert ranker["ctr_lift"] == pytest.approx((3 / 4) / (1 / 3) - 1)
    assert ranker["conversion_lift"] == pytest.approx(0.0)
    assert (ranker["ctr_diff_low"], ranker["ctr_diff_high"]) == pytest.approx(diff_interval(3, 4, 1, 3))
    assert popular["ctr_lift"] == pytest.approx(0.0)


def test_wilson_macro_matches_scipy_over_many_counts(con: duckdb.DuckDBPyConnection) -> None:
    cases = [(0, 1), (0, 50), (1, 50), (25, 50), (50, 50), (7, 1000), (999, 1000), (12345, 67890)]
    for k, n in cases:
        low, high = con.execute("SELECT wilson_low(?, ?), wilson_high(?, ?)", [k, n, k, n]).fetchone()
        assert (low, high) == pytest.approx(wilson(k, n), abs=1e-12), (k, n)
    assert con.execute("SELECT wilson_low(0, 0)").fetchone()[0] is None


def test_a_new_partition_shows_without_a_rebuild(tmp_path: Path) -> None:
    lake = make_lake(tmp_path / "lake")
    db = build_warehouse(tmp_path / "wh.duckdb", str(tmp_path / "lake"), str(tmp_path / "models"))
    late = Event(
        event_id=deterministic_event_id("wh-test", "late"),
        event_type=EventType.VIEW,
        ts=at(D3, 20, 0),
        anonymous_id="a_erin",
        item_id="i1",
    ).received(at(date(2024, 3, 7), 0, 5))
    lake.write_events(events_to_table([late]))
    with duckdb.connect(str(db), read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM events").fetchone()[0] == len(EVENTS) + 1
        assert connection.execute("SELECT max(dt) FROM events").fetchone()[0] == date(2024, 3, 7)


def test_empty_lake_still_has_every_view(tmp_path: Path) -> None:
    db = build_warehouse(tmp_path / "wh.duckdb", str(tmp_path / "no-lake"), str(tmp_path / "no-models"))
    views = [
        "events", "catalog", "impressions", "impression_items", "sessions", "daily_kpis", "funnel",
        "item_stats", "recommendation_items", "recommendation_performance", "model_runs", "experiment_results",
        "bandit_arms",
    ]  # fmt: skip
    with duckdb.connect(str(db), read_only=True) as connection:
        for view in views:
            assert connection.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == 0, view
        empty = connection.execute("SELECT empty_sources FROM warehouse_info").fetchone()[0]
    assert empty == ["lake_events", "lake_impressions", "lake_catalog", "registry_manifests"]


def test_events_without_impressions(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    lake.write_events(make_events())
    db = build_warehouse(tmp_path / "wh.duckdb", str(tmp_path / "lake"), str(tmp_path / "models"))
    with duckdb.connect(str(db), read_only=True) as connection:
        assert connection.execute("SELECT sum(sessions) FROM daily_kpis").fetchone()[0] == 8
        assert connection.execute("SELECT count(*) FROM experiment_results").fetchone()[0] == 0
        assert connection.execute("SELECT count(*) FROM recommendation_performance").fetchone()[0] == 0


def test_every_duckdb_connection_keeps_stdout_clean(tmp_path: Path) -> None:
    """DuckDB's progress bar (queries over ~2 s) would land inside `--json` output on a loaded machine."""
    from common import duck

    path = tmp_path / "w.duckdb"
    with duck.connect(str(path)) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
        assert con.sql("SELECT current_setting('enable_progress_bar')").fetchall() == [(False,)]
    with duck.connect(str(path), read_only=True) as con:
        assert con.sql("SELECT current_setting('enable_progress_bar')").fetchall() == [(False,)]
