"""Importers: a real slice of Online Retail gives exactly the expected events; the CSV importer maps any export."""

from __future__ import annotations

import csv
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pytest
import typer
from typer.testing import CliRunner

from common.events import table_to_events
from common.lake import Lake
from recs import data_cli
from recs.importers import (
    CsvFormat,
    category_of,
    import_csv,
    import_online_retail,
    parse_mapping,
    parse_type_map,
)

SAMPLE = Path(__file__).parent / "fixtures" / "online_retail_sample.csv"
NOT_PRODUCTS = {"POST", "DOT", "M", "C2", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS"}


def _expected() -> dict[str, object]:
    """What the import rules say the sample should give, computed straight from the CSV lines."""
    kept, dropped = [], Counter()
    with SAMPLE.open(newline="") as f:
        for line in csv.DictReader(f):
            if line["StockCode"] in NOT_PRODUCTS or line["StockCode"].startswith("gift_"):
                dropped["non-product"] += 1
            elif float(line["UnitPrice"]) <= 0:
                dropped["price"] += 1
            else:
                kept.append(line)
    sales = [x for x in kept if not x["InvoiceNo"].startswith("C")]
    returns = [x for x in kept if x["InvoiceNo"].startswith("C")]
    return {
        "kept": kept,
        "dropped": dropped,
        "sales": sales,
        "returns": returns,
        "sessions": {x["InvoiceNo"] for x in kept},
        "users": {str(int(float(x["CustomerID"]))) for x in kept if x["CustomerID"]},
        "guest_invoices": {x["InvoiceNo"] for x in kept if not x["CustomerID"]},
        "products": {x["StockCode"] for x in kept},
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(str(tmp_path_factory.mktemp("or") / "lake"))
    report = import_online_retail(SAMPLE, lake, chunk_rows=64)  # small chunks: invoices span chunk borders
    return lake, report, lake.read_events()


def test_online_retail_counts_match_the_rules(imported) -> None:
    _, report, events = imported
    want = _expected()
    types = Counter(events["event_type"].to_pylist())
    assert types == {"add_to_cart": len(want["sales"]), "purchase": len(want["sales"]), "remove_from_cart": len(want["returns"])}
    assert want["returns"] and want["guest_invoices"]  # the sample covers both
    assert report.rows_read == len(want["kept"]) + sum(want["dropped"].values())
    assert sum(n for r, n in report.dropped.items() if r.startswith("non-product")) == want["dropped"]["non-product"]
    assert report.dropped["zero or negative UnitPrice"] == want["dropped"]["price"] == 1
    assert report.dropped["non-product code POST"] == 1 and report.dropped["non-product code gift_* (voucher)"] == 1
    assert set(events["session_id"].to_pylist()) == {f"invoice-{i}" for i in want["sessions"]}
    assert set(events["user_id"].drop_null().to_pylist()) == want["users"]
    guests = events.filter(pc.is_null(events["user_id"]))
    assert set(guests["anonymous_id"].to_pylist()) == {f"guest-{i}" for i in want["guest_invoices"]}
    assert len(table_to_events(events)) == events.num_rows  # every event passes the schema


def test_an_invoice_is_carts_in_line_order_then_purchases(imported) -> None:
    events = imported[2]
    invoice = events.filter(pc.equal(events["session_id"], "invoice-536365")).sort_by("ts").to_pylist()
    lines = [x for x in _expected()["sales"] if x["InvoiceNo"] == "536365"]
    assert [e["event_type"] for e in invoice] == ["add_to_cart"] * len(lines) + ["purchase"] * len(lines)
    for part in (invoice[: len(lines)], invoice[len(lines) :]):
        assert [e["item_id"] for e in part] == [x["StockCode"] for x in lines]
        assert [e["quantity"] for e in part] == [int(float(x["Quantity"])) for x in lines]
        assert [e["price"] for e in part] == [float(x["UnitPrice"]) for x in lines]
    assert {e["user_id"] for e in invoice} == {"17850"}
    assert invoice[0]["ts"] == invoice[0]["received_at"] == datetime(2010, 12, 1, 8, 26, tzinfo=UTC)
    assert invoice[0]["context"]["country"] == "GB"


def test_a_cancellation_is_a_return_with_a_positive_quantity(imported) -> None:
    events = imported[2]
    returns = events.filter(pc.equal(events["session_id"], "invoice-C536391")).to_pylist()
    assert sorted((e["item_id"], e["quantity"]) for e in returns) == sorted(
        (x["StockCode"], -int(float(x["Quantity"]))) for x in _expected()["returns"] if x["InvoiceNo"] == "C536391"
    )
    assert {e["event_type"] for e in returns} == {"remove_from_cart"}
    assert {e["context"]["page"] for e in returns} == {"return"}


def test_online_retail_catalog_and_reimport(imported, tmp_path: Path) -> None:
    lake, _, events = imported
    catalog = lake.read_catalog()
    assert set(catalog["item_id"].to_pylist()) == _expected()["products"]
    titles = dict(zip(catalog["item_id"].to_pylist(), catalog["title"].to_pylist(), strict=True))
    assert titles["82567"] == "AIRLINE LOUNGE,METAL SIGN"  # a quoted comma survives
    again = import_online_retail(SAMPLE, lake)  # one chunk this time: same ids, nothing new
    assert again.files == 0
    assert lake.read_events().num_rows == events.num_rows


def test_online_retail_ii_and_spreadsheet_exports_import_as_the_same_events(imported, tmp_path: Path) -> None:
    # Online Retail II's header (Invoice, Price, Customer ID), InvoiceDate as a spreadsheet writes it and a
    # Latin-1 description: the same events, ids included, as the CRAN copy of the file gives.
    with SAMPLE.open(newline="") as f:
        rows = list(csv.DictReader(f))
    renamed = {"InvoiceNo": "Invoice", "UnitPrice": "Price", "CustomerID": "Customer ID"}
    path = tmp_path / "online_retail_II.csv"
    with path.open("w", newline="", encoding="latin-1") as f:
        writer = csv.DictWriter(f, fieldnames=[renamed.get(c, c) for c in rows[0]])
        writer.writeheader()
        for i, row in enumerate(rows):
            when = datetime.strptime(row["InvoiceDate"], "%Y-%m-%d %H:%M:%S")
            row["InvoiceDate"] = f"{when.month}/{when.day}/{when.year} {when.hour}:{when.minute:02d}"
            row["Description"] += " CAFÉ" if i == 0 else ""
            writer.writerow({renamed.get(c, c): v for c, v in row.items()})
    lake = Lake(str(tmp_path / "lake"))
    report = import_online_retail(path, lake, chunk_rows=64)
    assert report.dropped == imported[1].dropped
    columns = ["event_id", "event_type", "ts", "user_id", "session_id", "item_id", "quantity", "price"]
    assert lake.read_events().select(columns).sort_by("event_id") == imported[2].select(columns).sort_by("event_id")


def test_category_rule() -> None:
    assert category_of("WHITE HANGING HEART T-LIGHT HOLDER") == "Candles and Lights"
    assert category_of("JUMBO BAG RED RETROSPOT") == "Bags"
    assert category_of("ASSORTED COLOUR BIRD ORNAMENT") == "Garden"
    assert category_of("SOMETHING ELSE") == "uncategorised"


# ---------------------------------------------------------------- generic CSV


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_headerless_epoch_seconds_with_derived_sessions_and_bad_rows(tmp_path: Path) -> None:
    s = int(T0.timestamp())
    rows = [
        f"{s},alice,sku1,pv",
        f"{s + 600},alice,sku2,pv",
        f"{s + 700},alice,sku2,order",
        f"{s + 700 + 31 * 60},alice,sku3,pv",  # 31 minutes later: a new session
        f"{s + 60},bob,sku1,pv",
        "yesterday,bob,sku1,pv",  # bad time
        f"{s},,sku1,pv",  # nobody
        f"{s},bob,,pv",  # no item
        f"{s},bob,sku1,refund",  # unmapped type
    ]
    path = _csv(tmp_path / "export.csv", "\n".join(rows) + "\n")
    fmt = CsvFormat(
        mapping=parse_mapping("ts=1,user=2,item=3,type=4"), ts_unit="s", header=False,
        type_map=parse_type_map("view=pv,purchase=order"),
    )  # fmt: skip
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, fmt, chunk_rows=3)
    assert report.rows_read == 9
    assert report.dropped == {
        "ts is not epoch s": 1,
        "no user, anonymous or session id": 1,
        "missing item for an item event": 1,
        "unknown event type (add it to --type-map)": 1,
    }
    events = lake.read_events().sort_by("ts").to_pylist()
    assert [(e["user_id"], e["item_id"], e["event_type"]) for e in events if e["user_id"] == "alice"] == [
        ("alice", "sku1", "view"), ("alice", "sku2", "view"), ("alice", "sku2", "purchase"), ("alice", "sku3", "view"),
    ]  # fmt: skip
    alice_sessions = [e["session_id"] for e in events if e["user_id"] == "alice"]
    assert alice_sessions[0] == alice_sessions[1] == alice_sessions[2] != alice_sessions[3]
    assert report.sessions == 3
    assert events[0]["ts"] == T0 and events[0]["received_at"] == T0
    assert len(table_to_events(lake.read_events())) == 5
    assert import_csv(path, lake, fmt).files == 0  # re-import dedups


def test_derived_sessions_do_not_depend_on_where_a_persons_rows_lie_in_the_file(tmp_path: Path) -> None:
    # An export in no time order (Retailrocket's shape): one visitor's rows far apart, later ones first.
    # Sessions come from the whole file, whatever chunk each row is read in.
    s = int(T0.timestamp())
    rows = [f"{s + 3 * 3600},v1,i5", f"{s},v1,i1", *(f"{s + k},v{k},i{k % 4}" for k in range(2, 9))]
    rows += [f"{s + 600},v1,i2", f"{s + 3 * 3600 + 60},v1,i6", f"{s + 1200},v1,i3"]
    path = _csv(tmp_path / "e.csv", "t,who,what\n" + "\n".join(rows) + "\n")
    fmt = CsvFormat(mapping=parse_mapping("ts=t,anonymous=who,item=what"), ts_unit="s")
    lakes = {n: Lake(str(tmp_path / f"lake-{n}")) for n in (2, 1000)}
    reports = {n: import_csv(path, lake, fmt, chunk_rows=n) for n, lake in lakes.items()}
    visits = {
        n: sorted((e["ts"], e["item_id"], e["session_id"]) for e in lake.read_events().to_pylist() if e["anonymous_id"] == "v1")
        for n, lake in lakes.items()
    }  # fmt: skip
    assert visits[2] == visits[1000]
    assert [(item, session) for _, item, session in visits[2]] == [
        ("i1", "v1@20250601T120000"), ("i2", "v1@20250601T120000"), ("i3", "v1@20250601T120000"),
        ("i5", "v1@20250601T150000"), ("i6", "v1@20250601T150000"),
    ]  # fmt: skip
    assert reports[2].sessions == reports[1000].sessions == 9


@pytest.mark.parametrize("sessions", ["mapped", "derived"])
def test_rows_sharing_a_timestamp_replay_in_the_files_order(tmp_path: Path, sessions: str) -> None:
    # An invoice's lines at one minute: the lake orders equal times by event id, a hash, so without the
    # importer's microsecond steps these would come back shuffled. Chunks of 3 cut the tie twice.
    items = ["sku9", "sku1", "sku7", "sku3", "sku5", "sku2", "sku8"]
    rows = [f"2025-06-01T12:00:00Z,u1,{item},inv1" for item in items] + ["2025-06-01T12:01:00Z,u1,sku4,inv1"]
    rows += [f"2025-06-01T12:00:00Z,u2,{item},inv2" for item in reversed(items)]
    path = _csv(tmp_path / "e.csv", "ts,user,item,invoice\n" + "\n".join(rows) + "\n")
    mapping = "ts=ts,user=user,item=item" + (",session=invoice" if sessions == "mapped" else "")
    fmt = CsvFormat(mapping=parse_mapping(mapping), default_type="purchase")
    lake = Lake(str(tmp_path / "lake"))
    import_csv(path, lake, fmt, chunk_rows=3)
    replayed = lake.read_events().sort_by([("received_at", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])
    by_user = {user: [e for e in replayed.to_pylist() if e["user_id"] == user] for user in ("u1", "u2")}
    assert [e["item_id"] for e in by_user["u1"]] == [*items, "sku4"]
    assert [e["item_id"] for e in by_user["u2"]] == list(reversed(items))
    assert [e["ts"] - T0 for e in by_user["u1"]] == [timedelta(microseconds=k) for k in range(7)] + [timedelta(minutes=1)]
    assert all(e["received_at"] == e["ts"] for e in replayed.to_pylist())
    assert import_csv(path, lake, fmt, chunk_rows=5).files == 0  # ids hash the time the row says: a re-import dedups


def test_a_row_repeated_in_a_later_chunk_is_one_event_and_counted_once(tmp_path: Path) -> None:
    # The lake keeps one copy of an id whatever the chunks; the report and the ties' steps must agree.
    rows = ["12:00:00,u1,a,inv1", "12:00:00,u1,b,inv1", "12:00:00,u1,a,inv1", "12:00:00,u1,c,inv1"]
    rows += ["12:05:00,u2,a,inv2", "12:05:00,u2,a,inv2", "12:00:00,u1,b,inv1"]
    path = _csv(tmp_path / "e.csv", "ts,user,item,invoice\n" + "\n".join(f"2025-06-01T{r}" for r in rows) + "\n")
    fmt = CsvFormat(mapping=parse_mapping("ts=ts,user=user,item=item,session=invoice"), default_type="purchase")
    lakes = {n: Lake(str(tmp_path / f"lake-{n}")) for n in (2, 1000)}
    reports = {n: import_csv(path, lake, fmt, chunk_rows=n) for n, lake in lakes.items()}
    events = {
        n: sorted((e["user_id"], e["ts"], e["item_id"]) for e in lake.read_events().to_pylist()) for n, lake in lakes.items()
    }
    assert events[2] == events[1000]
    assert [(item, ts - T0) for user, ts, item in events[2] if user == "u1"] == [
        ("a", timedelta(0)), ("b", timedelta(microseconds=1)), ("c", timedelta(microseconds=2))
    ]
    for report in reports.values():
        assert report.events == 4 and report.rows_read == 7
        assert report.dropped == {"duplicate row (same content as an earlier row)": 3}


@pytest.mark.parametrize(
    ("unit", "value"),
    [("s", str(int(T0.timestamp()))), ("ms", str(int(T0.timestamp() * 1000))), ("iso", "2025-06-01T14:00:00+02:00"),
     ("iso", "2025-06-01 12:00:00"), ("iso", "2025-06-01 12:00:00 UTC"), ("%m/%d/%Y %H:%M", "6/1/2025 12:00"), ("%d.%m.%Y %H:%M %z", "01.06.2025 14:00 +0200")],
)  # fmt: skip
def test_time_units_all_read_as_utc(tmp_path: Path, unit: str, value: str) -> None:
    path = _csv(tmp_path / "e.csv", f"when;who;what;sess\n{value};u1;i1;S9\n")
    fmt = CsvFormat(mapping=parse_mapping("ts=when,user=who,item=what,session=sess"), sep=";", ts_unit=unit)
    lake = Lake(str(tmp_path / "lake"))
    import_csv(path, lake, fmt)
    (event,) = lake.read_events().to_pylist()
    assert event["ts"] == T0
    assert event["session_id"] == "S9" and event["event_type"] == "view"


def test_a_missing_user_written_as_na_leaves_the_session_its_own_visitor(tmp_path: Path) -> None:
    # Diginetica's shape: most sessions have userId "NA"; they must not merge into one person called NA.
    rows = ["1;NA;i1;2016-05-09", "1;NA;i2;2016-05-09", "2;NA;i1;2016-05-10", "3;77;i3;2016-05-10", "4;null;;2016-05-10"]
    path = _csv(tmp_path / "e.csv", "sessionId;userId;itemId;eventdate\n" + "\n".join(rows) + "\n")
    fmt = CsvFormat(mapping=parse_mapping("ts=eventdate,user=userId,item=itemId,session=sessionId"), sep=";")
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, fmt)
    assert report.dropped == {"missing item for an item event": 1}
    people = {(e["session_id"], e["user_id"], e["anonymous_id"]) for e in lake.read_events().to_pylist()}
    assert people == {("1", None, "session-1"), ("2", None, "session-2"), ("3", "77", "user-77")}
    assert report.users == 1 and report.anonymous_ids == 2


def test_a_date_and_an_offset_within_the_session_give_each_clicks_time(tmp_path: Path) -> None:
    # Diginetica's shape: eventdate is the session's date and timeframe each click's milliseconds into it;
    # the file's order is not the clicks' order, and an item clicked twice is two clicks, not a duplicate row.
    rows = ["1;NA;i2;5000;2016-05-09", "1;NA;i1;1000;2016-05-09", "1;NA;i2;90000;2016-05-09", "2;NA;i3;x;2016-05-09"]
    path = _csv(tmp_path / "e.csv", "sessionId;userId;itemId;timeframe;eventdate\n" + "\n".join(rows) + "\n")
    mapping = parse_mapping("ts=eventdate,offset_ms=timeframe,user=userId,item=itemId,session=sessionId")
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, CsvFormat(mapping=mapping, sep=";"))
    assert report.dropped == {"offset_ms is not a number of milliseconds in 0..31,622,400,000": 1}
    events = sorted(lake.read_events().to_pylist(), key=lambda e: e["ts"])
    day = datetime(2016, 5, 9, tzinfo=UTC)
    assert [(e["item_id"], e["ts"]) for e in events] == [
        ("i1", day + timedelta(seconds=1)), ("i2", day + timedelta(seconds=5)), ("i2", day + timedelta(seconds=90)),
    ]  # fmt: skip


def test_a_session_only_click_log_needs_no_user_column(tmp_path: Path) -> None:
    # YooChoose's shape: session, item and epoch seconds with milliseconds, no user or anonymous id at all.
    rows = ["3\t214716935\t1396437466.94", "3\t214832672\t1396438212.318", "6\t214701242\t1396796300.848"]
    path = _csv(tmp_path / "e.tsv", "SessionId\tItemId\tTime\n" + "\n".join(rows) + "\n")
    fmt = CsvFormat(mapping=parse_mapping("ts=Time,item=ItemId,session=SessionId"), sep="\t", ts_unit="s")
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, fmt)
    assert report.dropped == {} and report.users == 0 and report.anonymous_ids == 2
    events = sorted(lake.read_events().to_pylist(), key=lambda e: e["ts"])
    assert [(e["session_id"], e["anonymous_id"], e["item_id"]) for e in events] == [
        ("3", "session-3", "214716935"), ("3", "session-3", "214832672"), ("6", "session-6", "214701242"),
    ]  # fmt: skip
    assert events[0]["ts"] == datetime(2014, 4, 2, 11, 17, 46, 940000, tzinfo=UTC)


def test_public_exports_event_names_need_no_type_map(tmp_path: Path) -> None:
    # REES46's shape ("cart", zone written "UTC") and Retailrocket's and OTTO's names, any case; --type-map wins.
    names = ["view", "cart", "remove_from_cart", "purchase", "addtocart", "transaction", "Clicks", "orders", "refund"]
    rows = [f"2025-06-01 12:00:0{i} UTC,{name},sku{i},u1,sess1" for i, name in enumerate(names)]
    path = _csv(tmp_path / "e.csv", "event_time,event_type,product_id,user_id,user_session\n" + "\n".join(rows) + "\n")
    mapping = parse_mapping("ts=event_time,type=event_type,item=product_id,user=user_id,session=user_session")
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, CsvFormat(mapping=mapping, type_map=parse_type_map("wishlist=orders")))
    assert report.dropped == {"unknown event type (add it to --type-map)": 1}
    types = [e["event_type"] for e in lake.read_events().sort_by("ts").to_pylist()]
    assert types == ["view", "add_to_cart", "remove_from_cart", "purchase", "add_to_cart", "purchase", "click", "wishlist"]


def test_category_brand_or_title_columns_give_a_catalog_of_the_items_seen(tmp_path: Path) -> None:
    # REES46's shape: category_code and brand (often empty) and price on every event; the latest non-empty wins.
    rows = [
        "2019-10-01 00:00:05 UTC,view,p1,electronics.smartphone,apple,489.07,u1,s1",
        "2019-10-01 00:00:09 UTC,view,p2,,,12.5,u1,s1",
        "2019-10-02 08:00:00 UTC,purchase,p1,electronics.smartphone,,479.00,u2,s2",
        "2019-10-01 00:00:01 UTC,view,p2,appliances.kitchen,bosch,,u3,s3",
    ]
    header = "event_time,event_type,product_id,category_code,brand,price,user_id,user_session\n"
    path = _csv(tmp_path / "e.csv", header + "\n".join(rows) + "\n")
    mapping = "ts=event_time,type=event_type,item=product_id,category=category_code,brand=brand,price=price,user=user_id,session=user_session"
    lake = Lake(str(tmp_path / "lake"))
    import_csv(path, lake, CsvFormat(mapping=parse_mapping(mapping)), chunk_rows=2)  # facts summed across chunks
    catalog = {row["item_id"]: row for row in lake.read_catalog().to_pylist()}
    assert {item: (r["category_path"], r["category"], r["brand"], r["price"]) for item, r in catalog.items()} == {
        "p1": (["electronics.smartphone"], "electronics.smartphone", "apple", 479.0),
        "p2": (["appliances.kitchen"], "appliances.kitchen", "bosch", 12.5),
    }
    assert catalog["p2"]["created_at"] == datetime(2019, 10, 1, 0, 0, 1, tzinfo=UTC)
    assert catalog["p1"]["in_stock"] and not catalog["p1"]["promoted"]
    # Without those columns no catalog is written, as before.
    other = Lake(str(tmp_path / "other"))
    import_csv(path, other, CsvFormat(mapping=parse_mapping("ts=event_time,item=product_id,price=price,session=user_session")))
    assert other.read_catalog().num_rows == 0


def test_rows_off_the_time_pattern_are_counted_by_it(tmp_path: Path) -> None:
    path = _csv(tmp_path / "e.csv", "t,u,i\n6/1/2025 12:00,u1,i1\n2025-06-01 12:00,u1,i2\n")
    report = import_csv(path, Lake(str(tmp_path / "lake")), CsvFormat(mapping=parse_mapping("ts=t,user=u,item=i"), ts_unit="%m/%d/%Y %H:%M"))
    assert report.dropped == {"ts is not a time like '%m/%d/%Y %H:%M'": 1} and report.events_by_type == {"view": 1}


def test_quantity_price_and_future_rows_are_checked(tmp_path: Path) -> None:
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    path = _csv(
        tmp_path / "e.csv",
        "ts,user,item,qty,price\n"
        "2025-06-01T12:00:00Z,u1,i1,2,9.5\n"
        "2025-06-01T12:00:00Z,u1,i2,0,9.5\n"
        "2025-06-01T12:00:00Z,u1,i3,1.5,9.5\n"
        "2025-06-01T12:00:00Z,u1,i4,1,-3\n"
        f"{future},u1,i5,1,1\n",
    )
    fmt = CsvFormat(mapping=parse_mapping("ts=ts,user=user,item=item,quantity=qty,price=price"), default_type="add_to_cart")
    lake = Lake(str(tmp_path / "lake"))
    report = import_csv(path, lake, fmt)
    assert report.dropped == {
        "quantity outside 1..10,000": 1,
        "quantity is not a whole number": 1,
        "price outside 0..1,000,000": 1,
        "ts before 2000 or in the future": 1,
    }
    (event,) = lake.read_events().to_pylist()
    assert (event["item_id"], event["quantity"], event["price"], event["event_type"]) == ("i1", 2, 9.5, "add_to_cart")


def test_mapping_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing item"):
        parse_mapping("ts=a,user=b")
    with pytest.raises(ValueError, match="missing user or anonymous or session"):
        parse_mapping("ts=a,item=b,type=c")
    with pytest.raises(ValueError, match="'colour' is not one of"):
        parse_mapping("ts=a,user=b,item=c,colour=d")
    with pytest.raises(ValueError, match="'viewed' is not an event type"):
        parse_type_map("viewed=pv")
    with pytest.raises(ValueError, match="nor a strftime pattern"):
        CsvFormat(mapping=parse_mapping("ts=a,user=b,item=c"), ts_unit="dd/mm/yyyy")
    with pytest.raises(ValueError, match="positions counted from 1"):
        CsvFormat(mapping=parse_mapping("ts=a,user=2,item=3"), header=False)
    path = _csv(tmp_path / "e.csv", "time,user,item\n2025-06-01T12:00:00Z,u,i\n")
    with pytest.raises(ValueError, match=r"ts=ts .*the file has: time, user, item"):
        import_csv(path, Lake(str(tmp_path / "lake")), CsvFormat(mapping=parse_mapping("ts=ts,user=user,item=item")))


def test_cli_import_csv_prints_the_report(tmp_path: Path) -> None:
    app = typer.Typer()
    data_cli.register(app)
    path = _csv(tmp_path / "e.csv", "t,u,i\n1748779200,u1,i1\nnope,u1,i1\n")
    out = tmp_path / "lake"
    result = CliRunner().invoke(app, ["import", "csv", str(path), "--map", "ts=t,user=u,item=i", "--ts-unit", "s", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "imported 1 events from 2 rows" in result.output
    assert "ts is not epoch s" in result.output
    bad = CliRunner().invoke(app, ["import", "csv", str(path), "--map", "ts=t,user=u", "--out", str(out)])
    assert bad.exit_code != 0 and "missing item" in bad.output
