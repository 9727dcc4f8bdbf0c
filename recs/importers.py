"""Importers of real event history into the lake: the UCI Online Retail file and any CSV event export.

Both read their file in chunks, give every event a deterministic id (a re-import dedups), set
received_at = ts as DESIGN.md asks of history, and count every row they cannot map by reason.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from common.catalog import CATALOG_SCHEMA, MAX_BRAND, MAX_CATEGORY_NAME, MAX_TITLE, UNCATEGORISED
from common.events import (
    EARLIEST_TS,
    EVENT_SCHEMA,
    MAX_CLOCK_SKEW,
    SCHEMA_VERSION,
    EventType,
    deterministic_event_id,
)
from common.lake import Lake

CHUNK_ROWS = 100_000
WRITE_ROWS = 1_000_000  # events buffered per lake write of a CSV import
MAX_ID_LENGTH = 128
MAX_QUANTITY = 10_000
MAX_PRICE = 1_000_000
SESSION_GAP = pd.Timedelta(minutes=30)
MISSING_ID_WORDS = frozenset({"NA", "N/A", "NaN", "nan", "null", "NULL", "None"})  # e.g. Diginetica's userId "NA"
TIE_STEP = pd.Timedelta(microseconds=1)  # between rows of one session that share a timestamp (_keep_file_order)


@dataclass
class ImportReport:
    """What an import did: events written by type, and every row left out, by reason."""

    source: str
    rows_read: int = 0
    events_by_type: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    users: int = 0
    anonymous_ids: int = 0
    items: int = 0
    files: int = 0
    seconds: float = 0.0

    @property
    def events(self) -> int:
        return sum(self.events_by_type.values())

    def lines(self) -> list[str]:
        out = [
            f"imported {self.events:,} events from {self.rows_read:,} rows of {self.source} in {self.seconds:.1f}s",
            "  by type: " + ", ".join(f"{k}={v:,}" for k, v in self.events_by_type.most_common()),
            f"  {self.sessions:,} sessions, {self.users:,} users, {self.anonymous_ids:,} anonymous ids,"
            f" {self.items:,} items, {self.files} files",
        ]
        if self.dropped:
            out.append(f"  rows left out: {sum(self.dropped.values()):,}")
            out.extend(f"    {n:>8,}  {reason}" for reason, n in self.dropped.most_common())
        return out


# ---------------------------------------------------------------- shared: rows to lake columns


def _ids(*columns: pd.Series) -> list[str]:
    return [deterministic_event_id(*parts) for parts in zip(*columns, strict=True)]


def _strings(values: pd.Series) -> pa.Array:
    return pa.array(values.to_numpy(dtype=object), pa.string(), from_pandas=True)


def _context(n: int, page: pd.Series | None = None, country: pd.Series | None = None,
             extra: dict[str, pd.Series] | None = None) -> pa.StructArray:
    """The context struct; `extra` becomes the bounded key/value map (one entry per given key)."""
    context_type = EVENT_SCHEMA.field("context").type
    nulls = pa.nulls(n, pa.string())
    keys = list(extra or {})
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * len(keys))
    map_keys = pa.array(np.tile(np.array(keys, dtype=object), n) if keys else [], pa.string())
    map_values = (
        pa.array(np.stack([extra[k].to_numpy(dtype=object) for k in keys], axis=1).ravel(), pa.string())
        if extra
        else pa.array([], pa.string())
    )
    return pa.StructArray.from_arrays(
        [
            nulls,
            _strings(country) if country is not None else nulls,
            nulls,
            _strings(page) if page is not None else nulls,
            pa.MapArray.from_arrays(offsets, map_keys, map_values),
        ],
        fields=list(context_type),
    )


def _events_table(frame: pd.DataFrame, context: pa.StructArray) -> pa.Table:
    """Lake columns from a frame with event_id, event_type, ts (UTC), ids, quantity and price."""
    n = len(frame)
    ts = pa.array(frame["ts"].to_numpy(dtype="datetime64[us]"), pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
    quantity = frame["quantity"] if "quantity" in frame else pd.Series([None] * n, dtype="Int64")
    price = frame["price"] if "price" in frame else pd.Series([np.nan] * n)
    return pa.table(
        {
            "event_id": pa.array(frame["event_id"].tolist(), pa.string()),
            "event_type": _strings(frame["event_type"]),
            "ts": ts,
            "received_at": ts,
            "anonymous_id": _strings(frame["anonymous_id"]),
            "user_id": _strings(frame["user_id"]),
            "session_id": _strings(frame["session_id"]),
            "item_id": _strings(frame["item_id"]),
            "quantity": pa.array(quantity.astype("Int64"), pa.int64(), from_pandas=True),
            "price": pa.array(price.astype(float), pa.float64(), from_pandas=True),
            "query": _strings(frame["query"]) if "query" in frame else pa.nulls(n, pa.string()),
            "context": context,
            "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int64)),
        }
    )


def _count_people(report: ImportReport, users: set[str], anonymous: set[str], sessions: set[str]) -> None:
    report.users, report.anonymous_ids, report.sessions = len(users), len(anonymous), len(sessions)


# ---------------------------------------------------------------- Online Retail

# Codes that are postage, fees, discounts, manual adjustments or vouchers, not products.
NON_PRODUCT_CODES = frozenset(
    {"POST", "DOT", "M", "C2", "D", "S", "B", "BANK CHARGES", "AMAZONFEE", "CRUK", "PADS", "CARRIAGE",
     "ADJUST", "ADJUST2", "TEST001", "TEST002"}  # the last four: Online Retail II's adjustments and test lines
)
# First matching keyword (on the upper-cased description) names the category.
CATEGORY_KEYWORDS: list[tuple[str, tuple[str, ...]]] = [
    ("Christmas", ("CHRISTMAS", "XMAS", "ADVENT", "SANTA", "REINDEER", "SNOWFLAKE")),
    ("Bags", ("BAG", "PURSE", "TOTE")),
    ("Candles and Lights", ("CANDLE", "T-LIGHT", "TEALIGHT", "LANTERN", "LIGHT", "LAMP")),
    ("Kitchen and Dining", ("MUG", "CUP", "PLATE", "BOWL", "TEA", "CAKE", "BAKING", "LUNCH", "SPOON", "JAR",
                            "BOTTLE", "NAPKIN", "TRAY", "KITCHEN", "APRON", "GLASS")),
    ("Stationery and Wrap", ("CARD", "PAPER", "NOTEBOOK", "PEN", "PENCIL", "WRAP", "STICKER", "RIBBON", "TAPE")),
    ("Party", ("PARTY", "BUNTING", "BALLOON", "GARLAND")),
    ("Jewellery", ("NECKLACE", "BRACELET", "EARRING", "RING", "BROOCH", "HAIR")),
    ("Toys and Games", ("TOY", "GAME", "DOLL", "PUZZLE", "JIGSAW", "SKITTLES", "DOMINOES", "PLAYHOUSE")),
    ("Garden", ("GARDEN", "PLANT", "FLOWER", "BIRD", "WATERING")),
    ("Storage", ("BOX", "TIN", "BASKET", "DRAWER", "STORAGE", "HOOK", "HANGER")),
    ("Home Decor", ("SIGN", "FRAME", "CLOCK", "CUSHION", "DOORMAT", "MIRROR", "VASE", "ORNAMENT", "HEART",
                    "DECORATION", "WALL", "HOLDER", "THROW")),
]
COUNTRY_CODES = {
    "United Kingdom": "GB", "France": "FR", "Australia": "AU", "Netherlands": "NL", "Germany": "DE",
    "Norway": "NO", "EIRE": "IE", "Switzerland": "CH", "Spain": "ES", "Poland": "PL", "Portugal": "PT",
    "Italy": "IT", "Belgium": "BE", "Lithuania": "LT", "Japan": "JP", "Iceland": "IS", "Denmark": "DK",
    "Cyprus": "CY", "Sweden": "SE", "Austria": "AT", "Israel": "IL", "Finland": "FI", "Bahrain": "BH",
    "Greece": "GR", "Hong Kong": "HK", "Singapore": "SG", "Lebanon": "LB", "United Arab Emirates": "AE",
    "Saudi Arabia": "SA", "Czech Republic": "CZ", "Canada": "CA", "Brazil": "BR", "USA": "US",
    "European Community": "EU", "Malta": "MT", "RSA": "ZA",
}  # fmt: skip
ONLINE_RETAIL_COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"]
# Online Retail II (UCI 502: the same shop, 2009-2011) names three of them differently.
ONLINE_RETAIL_II_NAMES = {"Invoice": "InvoiceNo", "Price": "UnitPrice", "Customer ID": "CustomerID"}
# InvoiceDate as the CRAN copy writes it, then as spreadsheet exports of the UCI file do ("12/1/2010 8:26").
INVOICE_DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%m/%d/%Y %H:%M")
PURCHASE_DELAY = pd.Timedelta(seconds=30)  # an invoice's purchases come this long after its carts


def category_of(description: str) -> str:
    """The category a product description falls in by the keyword rule, or 'uncategorised'."""
    words = description.upper()
    for category, keywords in CATEGORY_KEYWORDS:
        if any(k in words for k in keywords):
            return category
    return UNCATEGORISED


def _non_product_reason(codes: pd.Series) -> pd.Series:
    upper = codes.str.upper()
    reason = pd.Series(None, index=codes.index, dtype=object)
    fixed = upper.isin(NON_PRODUCT_CODES)
    reason[fixed] = "non-product code " + upper[fixed]
    reason[codes.str.startswith("gift_")] = "non-product code gift_* (voucher)"
    return reason


def _online_retail_rows(chunk: pd.DataFrame, line_base: dict[str, int], report: ImportReport) -> pd.DataFrame:
    """Keep the product lines of a chunk, each with its parsed fields and its line number in its invoice."""
    chunk = chunk.copy()
    # Line numbers count every line of the invoice, kept or not, so ids do not depend on the rules.
    chunk["line"] = chunk.groupby("InvoiceNo", sort=False).cumcount() + chunk["InvoiceNo"].map(line_base).fillna(0).astype(int)
    for invoice, size in chunk.groupby("InvoiceNo", sort=False).size().items():
        line_base[str(invoice)] = line_base.get(str(invoice), 0) + int(size)

    chunk["qty"] = pd.to_numeric(chunk["Quantity"], errors="coerce")
    chunk["unit_price"] = pd.to_numeric(chunk["UnitPrice"], errors="coerce")
    chunk["ts"] = _invoice_dates(chunk["InvoiceDate"])
    cancelled = chunk["InvoiceNo"].str.startswith("C")
    reason = pd.Series(None, index=chunk.index, dtype=object)
    checks = [
        (chunk["InvoiceNo"].str.strip() == "", "missing InvoiceNo"),
        (chunk["StockCode"].str.strip() == "", "missing StockCode"),
        (chunk["ts"].isna(), "unparsable InvoiceDate"),
        (chunk["qty"].isna() | (chunk["qty"] % 1 != 0), "unparsable Quantity"),
        (chunk["unit_price"].isna(), "unparsable UnitPrice"),
    ]
    for bad, why in checks:
        reason = reason.where(reason.notna() | ~bad, why)
    reason = reason.where(reason.notna(), _non_product_reason(chunk["StockCode"]))
    more = [
        (chunk["unit_price"] <= 0, "zero or negative UnitPrice"),
        (chunk["qty"] == 0, "zero Quantity"),
        (~cancelled & (chunk["qty"] < 0), "negative Quantity outside a cancellation"),
        (cancelled & (chunk["qty"] > 0), "positive Quantity on a cancellation"),
        (chunk["qty"].abs() > MAX_QUANTITY, f"Quantity above {MAX_QUANTITY:,} (event schema limit)"),
        (chunk["unit_price"] > MAX_PRICE, f"UnitPrice above {MAX_PRICE:,}"),
    ]
    for bad, why in more:
        reason = reason.where(reason.notna() | ~bad.fillna(False), why)
    report.dropped.update(reason.dropna().value_counts().to_dict())
    return chunk[reason.isna()]


def _invoice_dates(values: pd.Series) -> pd.Series:
    parsed = pd.to_datetime(values, format=INVOICE_DATE_FORMATS[0], errors="coerce")
    for fmt in INVOICE_DATE_FORMATS[1:]:
        missing = parsed.isna()
        if missing.any():
            parsed[missing] = pd.to_datetime(values[missing], format=fmt, errors="coerce")
    return parsed


def _online_retail_events(rows: pd.DataFrame) -> pd.DataFrame:
    """add_to_cart per line then purchase per line for an invoice; remove_from_cart per line for a cancellation."""
    cancelled = rows["InvoiceNo"].str.startswith("C")
    customer = rows["CustomerID"].str.strip().str.replace(r"\.0+$", "", regex=True)
    guest = customer == ""
    base = pd.DataFrame(
        {
            "invoice": rows["InvoiceNo"],
            "line": rows["line"],
            "ts": rows["ts"] + pd.to_timedelta(rows["line"], unit="ms"),  # keeps the file's line order
            "user_id": customer.where(~guest, None),
            "anonymous_id": ("customer-" + customer).where(~guest, "guest-" + rows["InvoiceNo"]),
            "session_id": "invoice-" + rows["InvoiceNo"],
            "item_id": rows["StockCode"].str.strip(),
            "quantity": rows["qty"].abs().astype("int64"),
            "price": rows["unit_price"],
            "country_name": rows["Country"],
        }
    )
    carts = base[~cancelled].assign(event_type=EventType.ADD_TO_CART.value, page="cart")
    purchases = base[~cancelled].assign(event_type=EventType.PURCHASE.value, page="checkout")
    purchases["ts"] = purchases["ts"] + PURCHASE_DELAY
    returns = base[cancelled].assign(event_type=EventType.REMOVE_FROM_CART.value, page="return")
    events = pd.concat([carts, purchases, returns], ignore_index=True)
    events["event_id"] = _ids(pd.Series("online-retail", index=events.index), events["invoice"], events["line"], events["event_type"])
    return events


def import_online_retail(path: str | Path, lake: Lake, chunk_rows: int = CHUNK_ROWS) -> ImportReport:
    """Import the UCI Online Retail file (see README 'Online Retail import rules')."""
    clock = time.perf_counter()
    report = ImportReport(source=str(path))
    line_base: dict[str, int] = {}
    users: set[str] = set()
    anonymous: set[str] = set()
    sessions: set[str] = set()
    products: dict[str, dict[str, object]] = {}
    for chunk in _read_chunks(path, chunk_rows, sep=",", header=True):
        chunk = chunk.rename(columns=ONLINE_RETAIL_II_NAMES)
        missing = [c for c in ONLINE_RETAIL_COLUMNS if c not in chunk.columns]
        if missing:
            raise ValueError(f"{path} is not the Online Retail file: missing column(s) {', '.join(missing)}")
        report.rows_read += len(chunk)
        rows = _online_retail_rows(chunk, line_base, report)
        if rows.empty:
            continue
        _remember_products(products, rows)
        events = _online_retail_events(rows)
        context = _context(
            len(events),
            page=events["page"],
            country=events["country_name"].map(COUNTRY_CODES),
            extra={"country_name": events["country_name"]},
        )
        report.files += len(lake.write_events(_events_table(events, context)))
        report.events_by_type.update(events["event_type"].value_counts().to_dict())
        users.update(events["user_id"].dropna())
        anonymous.update(events["anonymous_id"][events["user_id"].isna()])
        sessions.update(events["session_id"])
    _count_people(report, users, anonymous, sessions)
    if products:
        newest = pd.Timestamp(max(p["last_seen"] for p in products.values()))  # type: ignore[type-var]
        lake.write_catalog(_online_retail_catalog(products), at=newest.tz_localize(UTC).to_pydatetime())
    report.items = len(products)
    report.seconds = time.perf_counter() - clock
    return report


def _remember_products(products: dict[str, dict[str, object]], rows: pd.DataFrame) -> None:
    """Title (first non-empty description), latest unit price, first and last time seen, per StockCode."""
    for code, title, price, ts in zip(rows["StockCode"].str.strip(), rows["Description"], rows["unit_price"], rows["ts"], strict=True):
        seen = products.get(code)
        if seen is None:
            products[code] = {"title": title.strip(), "price": float(price), "created_at": ts, "last_seen": ts}
            continue
        if not seen["title"] and title.strip():
            seen["title"] = title.strip()
        if ts >= seen["last_seen"]:  # type: ignore[operator]
            seen["price"], seen["last_seen"] = float(price), ts
        if ts < seen["created_at"]:  # type: ignore[operator]
            seen["created_at"] = ts


def _online_retail_catalog(products: dict[str, dict[str, object]]) -> pa.Table:
    codes = sorted(products)
    titles = [str(products[c]["title"]) for c in codes]
    return _catalog_table(
        codes, titles, [category_of(t) for t in titles], [None] * len(codes),
        [float(products[c]["price"]) for c in codes],  # type: ignore[arg-type]
        pd.Series([products[c]["created_at"] for c in codes]),
    )  # fmt: skip


def _catalog_table(
    item_ids: list[str], titles: list[str], categories: list[str], brands: list[str | None], prices: list[float],
    created_at: pd.Series,
) -> pa.Table:
    """A catalog snapshot of imported items: one category level ("" for none), all in stock, none promoted."""
    n = len(item_ids)
    created = pd.to_datetime(created_at, utc=True)
    return pa.table(
        {
            "item_id": item_ids,
            "title": titles,
            "category_path": [[c] if c else [] for c in categories],
            "category": [c or UNCATEGORISED for c in categories],
            "brand": pa.array(brands, pa.string()),
            "price": prices,
            "in_stock": [True] * n,
            "promoted": [False] * n,
            "created_at": pa.array(created.to_numpy(dtype="datetime64[us]")).cast(pa.timestamp("us", tz="UTC")),
        },
        schema=CATALOG_SCHEMA,
    )


# ---------------------------------------------------------------- generic CSV

# offset_ms: milliseconds added to ts, for exports that give a date and each click's offset within its session
# (Diginetica's eventdate and timeframe).
MAX_OFFSET_MS = 366 * 86_400_000  # a year: past that it is not an offset within a session
CSV_FIELDS = ("ts", "user", "item", "session", "type", "price", "quantity", "anonymous", "query", "offset_ms",
              "category", "brand", "title")  # fmt: skip
# Any of these mapped: the import also writes a catalog snapshot, one item per item id seen (REES46's category_code
# and brand ride on every event). Without them no catalog is written, as before.
CSV_CATALOG_FIELDS = ("category", "brand", "title")
CSV_REQUIRED = ("ts", "item")
CSV_VISITOR = ("user", "anonymous", "session")  # at least one: session-only click logs (YooChoose) have no user
TS_UNITS = ("s", "ms", "iso")


def parse_mapping(text: str) -> dict[str, str]:
    """`ts=COL,user=COL,...` as a dict; unknown or missing fields are named in the error."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, column = part.partition("=")
        if not sep or not column.strip():
            raise ValueError(f"--map entry {part!r} is not FIELD=COLUMN")
        if key.strip() not in CSV_FIELDS:
            raise ValueError(f"--map field {key.strip()!r} is not one of {', '.join(CSV_FIELDS)}")
        mapping[key.strip()] = column.strip()
    missing = [f for f in CSV_REQUIRED if f not in mapping]
    if not any(f in mapping for f in CSV_VISITOR):
        missing.append(" or ".join(CSV_VISITOR))
    if missing:
        raise ValueError(
            f"--map is missing {', '.join(missing)} (required: {', '.join(CSV_REQUIRED)} and one of {', '.join(CSV_VISITOR)})"
        )
    return mapping


# What public exports call our event types (Retailrocket, REES46, OTTO, ...), matched without case after
# --type-map and our own names.
TYPE_SYNONYMS = {
    **dict.fromkeys(("pageview", "page_view", "detail", "product_view", "view_item", "views"), "view"),
    **dict.fromkeys(("clicks",), "click"),
    **dict.fromkeys(("addtocart", "add-to-cart", "cart", "carts", "add_to_basket", "addtobasket", "basket"), "add_to_cart"),
    **dict.fromkeys(("removefromcart", "remove-from-cart", "remove_from_basket"), "remove_from_cart"),
    **dict.fromkeys(("transaction", "buy", "buys", "order", "orders", "checkout", "purchased"), "purchase"),
    **dict.fromkeys(("addtowishlist", "add_to_wishlist", "favorite", "favourite"), "wishlist"),
}


def parse_type_map(text: str | None) -> dict[str, str]:
    """`view=pageview|detail,purchase=order` as {source value: event type}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep:
            raise ValueError(f"--type-map entry {part!r} is not EVENT_TYPE=VALUE[|VALUE...]")
        if ours.strip() not in {t.value for t in EventType}:
            raise ValueError(f"--type-map: {ours.strip()!r} is not an event type ({', '.join(t.value for t in EventType)})")
        for value in theirs.split("|"):
            out[value.strip()] = ours.strip()
    return out


@dataclass(frozen=True)
class CsvFormat:
    mapping: dict[str, str]
    sep: str = ","
    ts_unit: str = "iso"
    type_map: dict[str, str] = field(default_factory=dict)
    default_type: str = EventType.VIEW.value
    header: bool = True

    def __post_init__(self) -> None:
        if self.ts_unit not in TS_UNITS and "%" not in self.ts_unit:
            raise ValueError(
                f"--ts-unit {self.ts_unit!r} is not one of {', '.join(TS_UNITS)} nor a strftime pattern such as '%d/%m/%Y %H:%M'"
            )
        if self.default_type not in {t.value for t in EventType}:
            raise ValueError(f"--default-type {self.default_type!r} is not an event type")
        if not self.header:
            for name, column in self.mapping.items():
                if not column.isdigit() or int(column) < 1:
                    raise ValueError(f"--map {name}={column}: with --no-header, columns are positions counted from 1")


def import_csv(path: str | Path, lake: Lake, fmt: CsvFormat, chunk_rows: int = CHUNK_ROWS) -> ImportReport:
    """Import a CSV event export. Without a session column, sessions split on a 30-minute gap per person."""
    clock = time.perf_counter()
    report = ImportReport(source=str(path))
    # Without a session column a person's rows may lie anywhere in the file: a first pass finds each
    # row's session from its person and time alone, so the file itself is never held in memory.
    starts = None if "session" in fmt.mapping else _session_starts(path, fmt, chunk_rows)
    users: set[str] = set()
    anonymous: set[str] = set()
    sessions: set[str] = set()
    items: set[str] = set()
    writes_catalog = any(f in fmt.mapping for f in CSV_CATALOG_FIELDS)
    facts: list[pd.DataFrame] = []  # per chunk, what each item's rows say of it (for the catalog)
    row_base = 0
    last_ties: dict[str, tuple[pd.Timestamp, int]] = {}
    imported = ImportedIds()
    unwritten: list[pa.Table] = []
    for chunk in _read_chunks(path, chunk_rows, sep=fmt.sep, header=fmt.header):
        columns = _csv_columns(chunk, fmt, path)
        report.rows_read += len(chunk)
        frame = _csv_rows(chunk, columns, fmt, report, row_base)
        row_base += len(chunk)
        if writes_catalog:
            facts.append(_item_facts(frame))
        if starts is not None:
            frame = _with_derived_sessions(frame, starts)
        if not frame.empty:
            unwritten.append(_csv_events(frame, report, users, anonymous, sessions, items, last_ties, imported))
        # Written in batches of a million or so: each write makes a file in every day it touches, and an
        # export in no time order touches all of them (a chunk at a time: 5,421 files for 139 days).
        if sum(t.num_rows for t in unwritten) >= WRITE_ROWS:
            report.files += len(lake.write_events(pa.concat_tables(unwritten)))
            unwritten = []
    if unwritten:
        report.files += len(lake.write_events(pa.concat_tables(unwritten)))
    _count_people(report, users, anonymous, sessions)
    report.items = len(items)
    if writes_catalog and items:
        catalog = _item_facts(pd.concat(facts, ignore_index=True))
        lake.write_catalog(_csv_catalog(catalog), at=catalog["last_seen"].max().tz_localize(UTC).to_pydatetime())
    report.seconds = time.perf_counter() - clock
    return report


def _item_facts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per item: first and last time seen, and the latest category, brand, title and price the rows give.

    `rows` are events (their `ts`) or earlier results (their own first and last times), so chunks' facts
    can be summed up in turn."""
    if "last_seen" not in rows:
        rows = rows.assign(created_at=rows["ts"], last_seen=rows["ts"])
    latest_last = rows.dropna(subset=["item_id"]).sort_values("last_seen", kind="stable")
    return latest_last.groupby("item_id", sort=True).agg(
        created_at=("created_at", "min"), last_seen=("last_seen", "max"),
        category=("category", "last"), brand=("brand", "last"), title=("title", "last"), price=("price", "last"),
    ).reset_index()  # fmt: skip


def _csv_catalog(facts: pd.DataFrame) -> pa.Table:
    return _catalog_table(
        facts["item_id"].tolist(),
        facts["title"].fillna("").str.slice(0, MAX_TITLE).tolist(),
        facts["category"].fillna("").str.slice(0, MAX_CATEGORY_NAME).tolist(),
        facts["brand"].str.slice(0, MAX_BRAND).tolist(),
        facts["price"].fillna(0.0).tolist(),
        facts["created_at"],
    )


def _read_chunks(path: str | Path, chunk_rows: int, sep: str, header: bool) -> Iterator[pd.DataFrame]:
    reader = pd.read_csv(
        path, sep=sep, header=0 if header else None, dtype=str, keep_default_na=False, chunksize=chunk_rows,
        compression="infer", on_bad_lines="error", encoding_errors="replace",  # a Latin-1 export's accents
    )  # fmt: skip
    with reader:
        for chunk in reader:
            if not header:
                chunk.columns = [str(i + 1) for i in range(chunk.shape[1])]
            yield chunk


def _csv_columns(chunk: pd.DataFrame, fmt: CsvFormat, path: str | Path) -> dict[str, str]:
    missing = {name: column for name, column in fmt.mapping.items() if column not in chunk.columns}
    if missing:
        have = ", ".join(map(str, chunk.columns))
        wanted = ", ".join(f"{k}={v}" for k, v in missing.items())
        raise ValueError(f"{path}: --map names column(s) not in the file: {wanted} (the file has: {have})")
    return fmt.mapping


def _parse_ts(values: pd.Series, unit: str) -> pd.Series:
    if unit == "iso":
        values = values.str.replace(r"\s*(?:UTC|GMT)$", "+00:00", regex=True)  # REES46 writes "2019-10-01 00:00:00 UTC"
        return pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601").dt.tz_localize(None)
    if "%" in unit:  # a strftime pattern; a time without a zone is UTC
        return pd.to_datetime(values, utc=True, errors="coerce", format=unit).dt.tz_localize(None)
    numbers = pd.to_numeric(values, errors="coerce")
    return pd.to_datetime(numbers, unit=unit, errors="coerce")


def _id_column(values: pd.Series) -> pd.Series:
    """Ids with the words exports write for a missing one (NA, null, ...) as empty."""
    return values.where(~values.isin(MISSING_ID_WORDS), "")


def _anonymous_ids(anon: pd.Series, user: pd.Series, session: pd.Series) -> pd.Series:
    """The row's anonymous id; else its user's; else, for a session of nobody known, the session's own."""
    return anon.where(anon != "", ("user-" + user).where(user != "", "session-" + session))


def _ts_unit_name(unit: str) -> str:
    return "an ISO time" if unit == "iso" else f"a time like {unit!r}" if "%" in unit else f"epoch {unit}"


def _csv_rows(chunk: pd.DataFrame, columns: dict[str, str], fmt: CsvFormat, report: ImportReport, row_base: int) -> pd.DataFrame:
    """Parse one chunk; rows that cannot become a valid event are counted by reason and left out."""
    def col(name: str) -> pd.Series:
        return chunk[columns[name]].str.strip() if name in columns else pd.Series("", index=chunk.index)

    raw_type = col("type")
    mapped = raw_type.map(fmt.type_map)
    lower = raw_type.str.lower()
    mapped = mapped.where(mapped.notna(), lower.where(lower.isin([t.value for t in EventType])))
    mapped = mapped.where(mapped.notna(), lower.map(TYPE_SYNONYMS))
    event_type = mapped.where(raw_type != "", fmt.default_type)
    offset = pd.to_numeric(col("offset_ms").replace("", "0"), errors="coerce")
    bad_offset = offset.isna() | (offset < 0) | (offset > MAX_OFFSET_MS)
    ts = _parse_ts(col("ts"), fmt.ts_unit) + pd.to_timedelta(offset.where(~bad_offset, 0), unit="ms")
    quantity = pd.to_numeric(col("quantity").replace("", None), errors="coerce")
    price = pd.to_numeric(col("price").replace("", None), errors="coerce")
    user, anon, item, session = (_id_column(col(name)) for name in ("user", "anonymous", "item", "session"))
    query = col("query")
    now = pd.Timestamp(datetime.now(UTC) + MAX_CLOCK_SKEW).tz_localize(None)
    needs_item = event_type.isin([t.value for t in EventType if t.value not in ("search", "identify")])
    checks = [
        (col("ts") == "", "missing ts"),
        (ts.isna(), f"ts is not {_ts_unit_name(fmt.ts_unit)}"),
        (bad_offset, f"offset_ms is not a number of milliseconds in 0..{MAX_OFFSET_MS:,}"),
        ((ts < pd.Timestamp(EARLIEST_TS).tz_localize(None)) | (ts > now), "ts before 2000 or in the future"),
        (event_type.isna(), "unknown event type (add it to --type-map)"),
        ((user == "") & (anon == "") & (session == ""), "no user, anonymous or session id"),
        (needs_item & (item == ""), "missing item for an item event"),
        ((event_type == "search") & (query == ""), "search without a query"),
        ((event_type == "identify") & (user == ""), "identify without a user"),
        ((col("quantity") != "") & (quantity.isna() | (quantity % 1 != 0)), "quantity is not a whole number"),
        (quantity.notna() & ((quantity < 1) | (quantity > MAX_QUANTITY)), f"quantity outside 1..{MAX_QUANTITY:,}"),
        ((col("price") != "") & price.isna(), "price is not a number"),
        (price.notna() & ((price < 0) | (price > MAX_PRICE)), f"price outside 0..{MAX_PRICE:,}"),
        (pd.concat([user, anon, item, col("session")], axis=1).map(len).max(axis=1) > MAX_ID_LENGTH,
         f"an id longer than {MAX_ID_LENGTH} characters"),
    ]  # fmt: skip
    reason = pd.Series(None, index=chunk.index, dtype=object)
    for bad, why in checks:
        reason = reason.where(reason.notna() | ~bad.fillna(False).astype(bool), why)
    report.dropped.update(reason.dropna().value_counts().to_dict())
    keep = reason.isna()
    return pd.DataFrame(
        {
            "row": np.arange(row_base, row_base + len(chunk))[keep.to_numpy()],
            "event_type": event_type[keep],
            "ts": ts[keep],
            "user_id": user[keep].replace("", None),
            "anonymous_id": _anonymous_ids(anon[keep], user[keep], session[keep]),
            "session_id": session[keep].replace("", None),
            "item_id": item[keep].replace("", None),
            "quantity": quantity[keep].astype("Int64"),
            "price": price[keep],
            "query": query[keep].replace("", None),
            **{name: col(name)[keep].replace("", None) for name in CSV_CATALOG_FIELDS},
        }
    )


def _person(frame: pd.DataFrame) -> pd.Series:
    return frame["user_id"].fillna(frame["anonymous_id"])


def _session_starts(path: str | Path, fmt: CsvFormat, chunk_rows: int) -> np.ndarray:
    """Per file row, the start time (datetime64[ns]) of the session it belongs to: a new session per
    person whenever 30 minutes pass without an event. Reads the file once, keeping a number for each
    person and the time and position of each row, not the rows (a 3.9M-row export took 4.8 GB held whole)."""
    numbers: dict[str, int] = {}
    people, times, rows = [], [], []
    row_base = 0
    for chunk in _read_chunks(path, chunk_rows, sep=fmt.sep, header=fmt.header):
        frame = _csv_rows(chunk, _csv_columns(chunk, fmt, path), fmt, ImportReport(source=str(path)), row_base)
        row_base += len(chunk)
        position, distinct = pd.factorize(_person(frame))
        people.append(np.array([numbers.setdefault(p, len(numbers)) for p in distinct], np.int64)[position])
        times.append(frame["ts"].to_numpy(dtype="datetime64[ns]"))
        rows.append(frame["row"].to_numpy())
    person, ts, row = (np.concatenate(parts) if parts else np.zeros(0, kind) for parts, kind in
                       ((people, np.int64), (times, "datetime64[ns]"), (rows, np.int64)))  # fmt: skip
    order = np.lexsort((row, ts, person))
    person, ts, row = person[order], ts[order], row[order]
    first = np.ones(len(order), bool)
    first[1:] = (person[1:] != person[:-1]) | (ts[1:] - ts[:-1] > SESSION_GAP.to_timedelta64())
    starts = np.empty(row_base, "datetime64[ns]")
    starts[row] = ts[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
    return starts


def _with_derived_sessions(frame: pd.DataFrame, starts: np.ndarray) -> pd.DataFrame:
    """The frame's rows with their session (`_session_starts`); ids are stable across re-imports."""
    start = pd.Series(starts[frame["row"].to_numpy()], index=frame.index)
    return frame.assign(session_id=_person(frame) + "@" + start.dt.strftime("%Y%m%dT%H%M%S"))


def _keep_file_order(frame: pd.DataFrame, last_ties: dict[str, tuple[pd.Timestamp, int]]) -> pd.DataFrame:
    """Rows of one session that share a timestamp keep the file's order: the k-th of them gets k TIE_STEPs more.

    The lake orders events by time, then by id (a hash), so an export whose clock ticks in seconds, minutes or
    days (an invoice's lines, a burst of clicks) would otherwise replay such sessions shuffled, and their order
    is what the co-visits and the next-item lists learn. `last_ties` holds, per session of the previous chunk,
    the timestamp of its last row and how many rows had it, for a tie that the chunk boundary cuts; it is
    replaced, so memory stays one chunk's sessions.
    """
    session = frame["session_id"].fillna(frame["anonymous_id"])
    ties = frame.groupby([session, frame["ts"]], sort=False).cumcount()
    carried_ts = session.map({s: t for s, (t, _) in last_ties.items()})
    carried_n = session.map({s: n for s, (_, n) in last_ties.items()})
    ties = ties + carried_n.where(carried_ts == frame["ts"], 0).fillna(0).astype("int64")
    last = pd.DataFrame({"session": session, "ts": frame["ts"], "next": ties + 1}).groupby("session", sort=False).tail(1)
    last_ties.clear()
    last_ties.update(zip(last["session"], zip(last["ts"], last["next"], strict=True), strict=True))
    return frame.assign(ts=frame["ts"] + ties.to_numpy() * TIE_STEP)


class ImportedIds:
    """The event ids of one import's rows so far, as 128-bit numbers (16 bytes a row, not a str each), in
    a few sorted blocks: one per recent call, merged into one when there are more than MERGED_BLOCKS."""

    def __init__(self) -> None:
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (high, low) halves, sorted by (high, low)

    def seen_before(self, event_ids: pd.Series) -> np.ndarray:
        """Whether each id (a UUID) was given to an earlier call; this call's ids are remembered."""
        halves = np.frombuffer(bytes.fromhex("".join(event_ids).replace("-", "")), ">u8").reshape(-1, 2)
        hi, lo = halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)
        seen = np.zeros(len(hi), bool)
        for block_hi, block_lo in self._blocks:
            left, right = np.searchsorted(block_hi, hi, "left"), np.searchsorted(block_hi, hi, "right")
            for row in np.flatnonzero(right > left):  # the high halves match: rare, so checked one by one
                seen[row] |= bool(np.any(block_lo[left[row] : right[row]] == lo[row]))
        self._blocks.append((hi, lo))
        if len(self._blocks) > MERGED_BLOCKS:
            hi, lo = np.concatenate([b[0] for b in self._blocks]), np.concatenate([b[1] for b in self._blocks])
            self._blocks = [(hi, lo)]
        order = np.lexsort((lo, hi))
        self._blocks[-1] = (hi[order], lo[order])
        return seen


# Blocks searched before they are merged into one: each chunk's lookups cost at most this many searches.
MERGED_BLOCKS = 8


def _csv_events(
    frame: pd.DataFrame, report: ImportReport, users: set[str], anonymous: set[str], sessions: set[str],
    items: set[str], last_ties: dict[str, tuple[pd.Timestamp, int]], imported: ImportedIds,
) -> pa.Table:
    """The chunk's rows as lake events, counted into the report and the sets of people and items."""
    # The id hashes what the row says, so importing the same export twice (or overlapping exports) dedups.
    key_columns = ["event_type", "ts", "user_id", "anonymous_id", "session_id", "item_id", "quantity", "price", "query"]
    frame = frame.assign(event_id=_ids(pd.Series("csv", index=frame.index), *(frame[c].astype(str) for c in key_columns)))
    # A repeat of a row in an earlier chunk too: the lake would keep one copy, and the report must not count two.
    duplicate = frame["event_id"].duplicated().to_numpy() | imported.seen_before(frame["event_id"])
    if duplicate.any():
        report.dropped["duplicate row (same content as an earlier row)"] += int(duplicate.sum())
        frame = frame[~duplicate]
    frame = _keep_file_order(frame, last_ties)  # after the ids: they hash the time the row says
    table = _events_table(frame, _context(len(frame)))
    report.events_by_type.update(frame["event_type"].value_counts().to_dict())
    users.update(frame["user_id"].dropna())
    anonymous.update(frame["anonymous_id"][frame["user_id"].isna()])
    sessions.update(frame["session_id"])
    items.update(frame["item_id"].dropna())
    return table

