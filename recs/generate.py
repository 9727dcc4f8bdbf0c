"""A synthetic storefront: a seeded, deterministic catalog and event history written to the lake.

Everything is drawn with numpy in whole columns (no per-event Python objects), so a million
events take seconds. The same size, seed and end date always give byte-identical lake files.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.catalog import CATALOG_SCHEMA
from common.events import EVENT_SCHEMA, SCHEMA_VERSION, EventType
from common.lake import Lake

DEFAULT_END_DATE = date(2026, 11, 1)
US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S

# Top category -> leaves. Leaf names are unique, because `category` (the leaf) is the unit of affinity.
CATEGORY_TREE: dict[str, list[str]] = {
    "Women": ["Dresses", "Women's Tops", "Women's Jeans", "Women's Shoes", "Handbags"],
    "Men": ["Men's Shirts", "Men's Trousers", "Men's Shoes", "Men's Jackets"],
    "Electronics": ["Phones", "Laptops", "Headphones", "Cameras", "Smartwatches", "Chargers"],
    "Home": ["Furniture", "Bedding", "Lighting", "Kitchenware", "Decor"],
    "Beauty": ["Skincare", "Makeup", "Fragrance", "Haircare"],
    "Sports": ["Running", "Cycling", "Yoga", "Camping", "Fitness"],
    "Toys": ["Board Games", "Puzzles", "Dolls", "Building Sets"],
    "Books": ["Fiction", "Cookbooks", "Children's Books", "Business", "Travel Guides", "Comics"],
}
MEDIAN_PRICE = {"Women": 45, "Men": 50, "Electronics": 220, "Home": 60, "Beauty": 25, "Sports": 55, "Toys": 30, "Books": 15}
BRAND_SYLLABLES = ["ar", "bel", "cor", "dan", "el", "fin", "gal", "hav", "ion", "jur", "kel", "lum", "mor", "nov", "or", "pra"]
ADJECTIVES = ["Classic", "Urban", "Essential", "Premium", "Eco", "Smart", "Vintage", "Compact", "Deluxe", "Everyday"]
# Title words: each leaf draws its own vocabulary from these syllables; a cluster of related items
# shares a product-line word of its leaf, so a title says which leaf and line an item is in, not exactly.
WORD_SYLLABLES = ["ka", "lo", "mi", "ter", "va", "sen", "ru", "dex", "pol", "an", "zi", "bor", "fle", "nu", "qua", "sto"]
LEAF_WORDS = 12
COUNTRIES = (["GB", "DE", "FR", "US", "NL", "ES", "IT", "PL"], [0.40, 0.12, 0.11, 0.15, 0.06, 0.06, 0.06, 0.04])
DEVICES = (["mobile", "desktop", "tablet"], [0.55, 0.35, 0.10])
REFERRERS = (["direct", "google", "email", "social", "ads"], [0.35, 0.30, 0.12, 0.13, 0.10])
# Share of hours of the day on which sessions start (evening peak, quiet night).
HOURLY = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 4, 4, 4.5, 4, 4, 4, 4.5, 5, 6, 7, 7.5, 6.5, 4.5, 2.5])

# Behaviour. Tuned so views->cart lands near 9% and carts->purchase near 40%.
GUEST_SHARE = 0.30  # sessions of visitors who never log in
IDENTIFY_SHARE = 0.12  # sessions of known users that start anonymous and log in part-way
NEW_USER_SHARE = 0.25  # users whose first visit falls inside the window
NEW_ITEM_SHARE = 0.20  # items created inside the window
OUT_OF_STOCK_SHARE = 0.05  # items sold out (in the catalog, never in events)
MEAN_VIEWS = 5.0
MAX_VIEWS = 40
SEARCH_SHARE = 0.15
CLICK_RATE = 0.30  # a view reached by clicking a tile (listing or recommendation)
CART_RATE = (0.05, 0.14)  # (off-taste, on-taste) items
WISHLIST_RATE = 0.02
REMOVE_RATE = 0.12
CHECKOUT_RATE = 0.45  # sessions with a cart that check out
# Next view in a session: a related item (co-visit cluster), the same leaf, a taste leaf, or anything popular.
P_RELATED, P_SAME_LEAF, P_TASTE = 0.40, 0.35, 0.15
CLUSTER = 5  # related items come in clusters of this many inside a leaf
MAX_DRIFT = 0.5  # share of a user's taste that has moved to a new leaf by the window's end
EVENTS_PER_SESSION = 7.6  # measured; turns a target event count into a session count


@dataclass(frozen=True)
class SizeSpec:
    events: int
    days: int
    users: int
    items: int


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(events=5_000, days=14, users=250, items=300),
    "small": SizeSpec(events=100_000, days=30, users=3_000, items=2_000),
    "medium": SizeSpec(events=1_000_000, days=30, users=25_000, items=10_000),
    "large": SizeSpec(events=10_000_000, days=30, users=200_000, items=50_000),
}


@dataclass
class GenerateSummary:
    size: str
    seed: int
    start: datetime
    end: datetime
    events: int = 0
    events_by_type: dict[str, int] = field(default_factory=dict)
    users: int = 0
    items: int = 0
    new_items: int = 0
    sessions: int = 0
    files: int = 0
    seconds: float = 0.0

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def lines(self) -> list[str]:
        by_type = ", ".join(f"{k}={v:,}" for k, v in sorted(self.events_by_type.items(), key=lambda kv: -kv[1]))
        return [
            f"generated {self.events:,} events ({self.size}, seed {self.seed}) in {self.seconds:.1f}s",
            f"  by type: {by_type}",
            f"  {self.users:,} users, {self.sessions:,} sessions, {self.items:,} items ({self.new_items:,} new),"
            f" {self.days} days {self.start:%Y-%m-%d}..{self.end:%Y-%m-%d}, {self.files} files",
        ]


# ---------------------------------------------------------------- catalog


@dataclass
class Catalog:
    """Items in leaf order (item index i belongs to leaf `leaf[i]`), with what sampling needs."""

    labels: pa.Array  # item_id strings
    leaf: np.ndarray
    price: np.ndarray
    created_us: np.ndarray
    in_stock: np.ndarray  # sold-out items draw no traffic (see build_catalog)
    weight_cum: np.ndarray  # cumulative Zipf popularity over all items
    leaf_start: np.ndarray
    leaf_end: np.ndarray
    leaf_head: np.ndarray  # the most popular item of each leaf; always exists before the window
    leaf_names: list[str]
    leaf_top: list[str]
    table: pa.Table


def build_catalog(
    rng: np.random.Generator, n_items: int, start_us: int, end_us: int, text_rng: np.random.Generator
) -> Catalog:
    """The items; `text_rng` draws only their title words, so titles leave every other draw as it was."""
    tops = list(CATEGORY_TREE)
    leaf_names = [leaf for top in tops for leaf in CATEGORY_TREE[top]]
    leaf_top = [top for top in tops for _ in CATEGORY_TREE[top]]
    n_leaves = len(leaf_names)
    # Some leaves are much bigger than others; every leaf gets at least CLUSTER items.
    share = rng.dirichlet(np.full(n_leaves, 2.0))
    counts = np.maximum(CLUSTER, np.floor(share * n_items)).astype(np.int64)
    leaf = np.repeat(np.arange(n_leaves), counts)
    n = len(leaf)
    leaf_end = np.cumsum(counts)
    leaf_start = leaf_end - counts

    # Zipf popularity within each leaf (random rank, so related clusters mix heads and tails), scaled by leaf size.
    local = np.arange(n) - leaf_start[leaf]
    rank = np.empty(n, np.int64)
    for lf in range(n_leaves):
        rank[leaf_start[lf] : leaf_end[lf]] = rng.permutation(counts[lf]) + 1
    weight = 1.0 / rank**1.1 * np.sqrt(counts[leaf])
    leaf_head = np.array([leaf_start[lf] + int(np.argmin(rank[leaf_start[lf] : leaf_end[lf]])) for lf in range(n_leaves)])

    top_of_leaf = np.array([tops.index(t) for t in leaf_top])
    leaf_median = np.array([MEDIAN_PRICE[t] for t in leaf_top]) * rng.lognormal(0, 0.4, n_leaves)
    price = np.round(np.maximum(0.99, leaf_median[leaf] * rng.lognormal(0, 0.45, n)), 0) - 0.01

    # Items on sale before the window, plus daily arrivals inside it (never a leaf's head).
    window = end_us - start_us
    created = start_us - rng.integers(US_PER_DAY, 365 * US_PER_DAY, n)
    arriving = rng.random(n) < NEW_ITEM_SHARE
    arriving[leaf_head] = False
    created[arriving] = start_us + rng.integers(0, int(window * 0.95), int(arriving.sum()))
    created = created // US_PER_S * US_PER_S

    brands_per_top = [
        sorted({(rng.choice(BRAND_SYLLABLES) + rng.choice(BRAND_SYLLABLES)).capitalize() for _ in range(8)})
        for _ in tops
    ]
    brand = [brands_per_top[top_of_leaf[leaf[i]]][int(rng.integers(len(brands_per_top[top_of_leaf[leaf[i]]])))] for i in range(n)]
    adjective = rng.integers(len(ADJECTIVES), size=n)
    labels = pa.array([f"p{k:06d}" for k in rng.permutation(n) + 1])
    titles = _titles(text_rng, leaf, local, brand, [ADJECTIVES[a] for a in adjective], n_leaves)
    # Sold-out items stay in the catalog but draw no traffic: the catalog is the shop as it is now, and
    # a shop whose customers keep viewing and buying what it cannot sell would make the out-of-stock
    # rule look like a relevance loss. A leaf's head is always in stock, so every leaf can be sampled.
    in_stock = rng.random(n) > OUT_OF_STOCK_SHARE
    in_stock[leaf_head] = True
    weight[~in_stock] = 0.0
    table = pa.table(
        {
            "item_id": labels,
            "title": titles,
            "category_path": [[leaf_top[lf], leaf_names[lf]] for lf in leaf],
            "category": [leaf_names[lf] for lf in leaf],
            "brand": brand,
            "price": price,
            "in_stock": in_stock,
            "promoted": rng.random(n) < 0.05,
            "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
        },
        schema=CATALOG_SCHEMA,
    )
    return Catalog(labels, leaf, price, created, in_stock, np.cumsum(weight), leaf_start, leaf_end, leaf_head, leaf_names, leaf_top, table)


def _titles(
    rng: np.random.Generator, leaf: np.ndarray, local: np.ndarray, brand: list[str], noise: list[str], n_leaves: int
) -> list[str]:
    """brand, a shared noise word, the cluster's product-line word and a random word of the leaf's vocabulary."""
    vocab = [
        sorted({"".join(rng.choice(WORD_SYLLABLES, size=3)) for _ in range(LEAF_WORDS)}) for _ in range(n_leaves)
    ]
    line = [vocab[leaf[i]][(local[i] // CLUSTER) % len(vocab[leaf[i]])] for i in range(len(leaf))]
    extra = [vocab[leaf[i]][int(rng.integers(len(vocab[leaf[i]])))] for i in range(len(leaf))]
    return [f"{brand[i]} {noise[i]} {line[i].capitalize()} {extra[i]}" for i in range(len(leaf))]


def sample_in_leaf(cat: Catalog, rng: np.random.Generator, leaves: np.ndarray) -> np.ndarray:
    """One popularity-weighted item per requested leaf."""
    lo = np.where(cat.leaf_start[leaves] > 0, cat.weight_cum[cat.leaf_start[leaves] - 1], 0.0)
    hi = cat.weight_cum[cat.leaf_end[leaves] - 1]
    picked = np.searchsorted(cat.weight_cum, lo + rng.random(len(leaves)) * (hi - lo), side="right")
    return np.clip(picked, cat.leaf_start[leaves], cat.leaf_end[leaves] - 1)


def sample_global(cat: Catalog, rng: np.random.Generator, n: int) -> np.ndarray:
    picked = np.searchsorted(cat.weight_cum, rng.random(n) * cat.weight_cum[-1], side="right")
    return np.minimum(picked, len(cat.leaf) - 1)


def sample_related(cat: Catalog, rng: np.random.Generator, items: np.ndarray) -> np.ndarray:
    """Another item of the same related cluster (a run of CLUSTER items inside a leaf)."""
    lf = cat.leaf[items]
    start = cat.leaf_start[lf] + (items - cat.leaf_start[lf]) // CLUSTER * CLUSTER
    size = np.minimum(CLUSTER, cat.leaf_end[lf] - start)
    offset = (items - start + 1 + (rng.random(len(items)) * np.maximum(size - 1, 1)).astype(np.int64)) % size
    return start + offset


def available(cat: Catalog, rng: np.random.Generator, items: np.ndarray, at_us: np.ndarray) -> np.ndarray:
    """Replace items not on sale at `at_us` (not yet created, or sold out) by others of their leaf (the
    leaf head at worst)."""
    items = items.copy()
    for _ in range(3):
        early = np.flatnonzero((cat.created_us[items] > at_us) | ~cat.in_stock[items])
        if len(early) == 0:
            return items
        items[early] = sample_in_leaf(cat, rng, cat.leaf[items[early]])
    early = np.flatnonzero((cat.created_us[items] > at_us) | ~cat.in_stock[items])
    items[early] = cat.leaf_head[cat.leaf[items[early]]]
    return items


# ---------------------------------------------------------------- users and sessions


@dataclass
class Users:
    taste: np.ndarray  # (n, 3) leaf ids; only the first taste_n are used
    taste_n: np.ndarray
    drift_leaf: np.ndarray  # the leaf their taste moves towards over the window
    joined_frac: np.ndarray  # 0 for returning users, else when in the window they first came
    country: np.ndarray
    device: np.ndarray
    activity: np.ndarray


def build_users(rng: np.random.Generator, n: int, n_leaves: int) -> Users:
    taste = rng.integers(0, n_leaves, size=(n, 3))
    # Taste leaves cluster: the second and third are often a sibling of the first (same top category).
    drift = (taste[:, 0] + rng.integers(1, n_leaves, n)) % n_leaves
    joined = np.where(rng.random(n) < NEW_USER_SHARE, rng.random(n) * 0.9, 0.0)
    return Users(
        taste=taste,
        taste_n=rng.integers(1, 4, n),
        drift_leaf=drift,
        joined_frac=joined,
        country=rng.choice(len(COUNTRIES[0]), n, p=COUNTRIES[1]),
        device=rng.choice(len(DEVICES[0]), n, p=DEVICES[1]),
        activity=rng.lognormal(0, 1.0, n),
    )


@dataclass
class Sessions:
    """One row per session, sorted by start time."""

    start_us: np.ndarray
    user: np.ndarray  # user index, -1 for guests
    kind: np.ndarray  # 0 logged in, 1 logs in part-way, 2 guest
    views: np.ndarray
    search: np.ndarray
    taste: np.ndarray  # (n, 3) leaves the session draws from
    taste_n: np.ndarray
    country: np.ndarray
    device: np.ndarray
    referrer: np.ndarray


def build_sessions(
    rng: np.random.Generator, users: Users, n_sessions: int, n_leaves: int, start_us: int, days: int
) -> Sessions:
    kind = rng.choice(3, n_sessions, p=[1 - GUEST_SHARE - IDENTIFY_SHARE, IDENTIFY_SHARE, GUEST_SHARE])
    user = rng.choice(len(users.activity), n_sessions, p=users.activity / users.activity.sum())
    user = np.where(kind == 2, -1, user)
    known = user >= 0
    uidx = np.maximum(user, 0)

    # When: a day after the user joined, an hour by the daily curve, any second of it.
    joined = np.where(known, users.joined_frac[uidx], 0.0)
    day_frac = joined + rng.random(n_sessions) * (1 - joined)
    day = np.minimum((day_frac * days).astype(np.int64), days - 1)
    hour = rng.choice(24, n_sessions, p=HOURLY / HOURLY.sum())
    start = start_us + day * US_PER_DAY + hour * 3600 * US_PER_S + rng.integers(0, 3600, n_sessions) * US_PER_S
    start = np.maximum(start, start_us + (joined * days * US_PER_DAY).astype(np.int64))

    # Tastes drift: later in the window a growing share of a user's taste moves to their drift leaf.
    progress = (start - start_us) / (days * US_PER_DAY)
    taste = np.where(known[:, None], users.taste[uidx], rng.integers(0, n_leaves, (n_sessions, 3)))
    taste_n = np.where(known, users.taste_n[uidx], rng.integers(1, 3, n_sessions))
    drifted = known & (rng.random(n_sessions) < MAX_DRIFT * progress)
    taste[drifted, 0] = users.drift_leaf[uidx[drifted]]

    own_device = rng.random(n_sessions) < 0.85
    order = np.argsort(start, kind="stable")
    sessions = Sessions(
        start_us=start,
        user=user,
        kind=kind,
        views=np.minimum(rng.geometric(1 / MEAN_VIEWS, n_sessions), MAX_VIEWS),
        search=rng.random(n_sessions) < SEARCH_SHARE,
        taste=taste,
        taste_n=taste_n,
        country=np.where(known, users.country[uidx], rng.choice(len(COUNTRIES[0]), n_sessions, p=COUNTRIES[1])),
        device=np.where(known & own_device, users.device[uidx], rng.choice(len(DEVICES[0]), n_sessions, p=DEVICES[1])),
        referrer=rng.choice(len(REFERRERS[0]), n_sessions, p=REFERRERS[1]),
    )
    for name in sessions.__dataclass_fields__:
        setattr(sessions, name, getattr(sessions, name)[order])
    return sessions


# ---------------------------------------------------------------- events, one chunk of sessions at a time


def _taste_pick(rng: np.random.Generator, taste: np.ndarray, taste_n: np.ndarray) -> np.ndarray:
    which = (rng.random(len(taste_n)) * taste_n).astype(np.int64)
    return taste[np.arange(len(taste_n)), which]


def browse(cat: Catalog, rng: np.random.Generator, s: Sessions, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The items each session views, step by step: (items (n, MAX_VIEWS) padded with -1, search leaf)."""
    n = len(rows)
    t0 = s.start_us[rows]
    taste, taste_n = s.taste[rows], s.taste_n[rows]
    search_leaf = _taste_pick(rng, taste, taste_n)
    first_leaf = np.where(s.search[rows] | (rng.random(n) < 0.75), search_leaf, -1)
    first = np.where(first_leaf >= 0, sample_in_leaf(cat, rng, np.maximum(first_leaf, 0)), sample_global(cat, rng, n))
    items = np.full((n, MAX_VIEWS), -1, np.int64)
    items[:, 0] = available(cat, rng, first, t0)
    views = s.views[rows]
    for step in range(1, int(views.max(initial=1))):
        live = np.flatnonzero(views > step)
        prev = items[live, step - 1]
        r = rng.random(len(live))
        nxt = sample_global(cat, rng, len(live))
        same_leaf = r < P_RELATED + P_SAME_LEAF
        nxt[same_leaf] = sample_in_leaf(cat, rng, cat.leaf[prev[same_leaf]])
        related = r < P_RELATED
        nxt[related] = sample_related(cat, rng, prev[related])
        in_taste = (r >= P_RELATED + P_SAME_LEAF) & (r < P_RELATED + P_SAME_LEAF + P_TASTE)
        nxt[in_taste] = sample_in_leaf(cat, rng, _taste_pick(rng, taste[live[in_taste]], taste_n[live[in_taste]]))
        items[live, step] = available(cat, rng, nxt, t0[live])
    return items, search_leaf


@dataclass
class Columns:
    """Event columns being assembled; each `add` appends one event type."""

    parts: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, **cols: np.ndarray) -> None:
        for name, values in cols.items():
            self.parts.setdefault(name, []).append(values)

    def get(self, name: str) -> np.ndarray:
        return np.concatenate(self.parts[name])


def session_events(cat: Catalog, rng: np.random.Generator, s: Sessions, rows: np.ndarray) -> pa.Table:
    """All events of the sessions `rows` (indexes into `s`, which also number the sessions)."""
    items, search_leaf = browse(cat, rng, s, rows)
    n = len(rows)
    valid = items >= 0
    sess_local, step = np.nonzero(valid)  # session-major, steps in order
    item = items[sess_local, step]
    taste = s.taste[rows][sess_local]
    used = np.arange(3)[None, :] < s.taste_n[rows][sess_local][:, None]
    match = ((taste == cat.leaf[item][:, None]) & used).any(axis=1)

    # Time: views follow each other by the dwell on the previous one plus a browsing gap.
    dwell_ms = np.minimum(rng.lognormal(np.log(20_000), 0.9, len(item)) * np.where(match, 1.6, 1.0), 1_800_000).astype(np.int64)
    gap_us = dwell_ms * 1000 + (rng.lognormal(np.log(8), 0.6, len(item)) * US_PER_S).astype(np.int64)
    lead_us = np.where(s.search[rows], 10 * US_PER_S, 0)[sess_local]
    cum = np.cumsum(gap_us)
    first_of_session = np.r_[0, np.flatnonzero(np.diff(sess_local)) + 1]
    before = np.repeat(cum[first_of_session] - gap_us[first_of_session], np.diff(np.r_[first_of_session, len(item)]))
    view_ts = s.start_us[rows][sess_local] + lead_us + (cum - gap_us - before)
    scroll = np.round(np.clip(rng.beta(2, 2.5, len(item)) + np.where(match, 0.15, 0), 0, 1), 2)
    session_end = view_ts[np.r_[first_of_session[1:] - 1, len(item) - 1]] + dwell_ms[np.r_[first_of_session[1:] - 1, len(item) - 1]] * 1000

    cols = Columns()
    none_i = np.full(len(item), -1, np.int64)

    def add(etype: EventType, mask: np.ndarray, ts: np.ndarray, **extra: np.ndarray) -> None:
        k = int(mask.sum()) if mask.dtype == bool else len(mask)
        base = {
            "type": np.full(k, list(EventType).index(etype)),
            "sess": sess_local[mask],
            "ts": ts[mask],
            "item": item[mask],
            "dwell": none_i[mask],
            "scroll": np.full(k, np.nan),
            "qty": np.full(k, -1),
            "query": np.full(k, -1),
        }
        base.update({key: value[mask] for key, value in extra.items()})
        cols.add(**base)

    everything = np.ones(len(item), bool)
    add(EventType.VIEW, everything, view_ts, dwell=dwell_ms, scroll=scroll)
    add(EventType.CLICK, rng.random(len(item)) < CLICK_RATE, view_ts - 800_000)
    wish = rng.random(len(item)) < WISHLIST_RATE
    add(EventType.WISHLIST, wish, view_ts + dwell_ms * 500)
    carted = rng.random(len(item)) < np.where(match, CART_RATE[1], CART_RATE[0])
    qty = np.minimum(rng.geometric(0.75, len(item)), 10)
    add(EventType.ADD_TO_CART, carted, view_ts + dwell_ms * 700, qty=qty)
    removed = carted & (rng.random(len(item)) < REMOVE_RATE)
    end_of = session_end[sess_local]
    add(EventType.REMOVE_FROM_CART, removed, end_of + 5 * US_PER_S + step * 1000, qty=qty)
    checkout = (rng.random(n) < CHECKOUT_RATE)[sess_local]
    bought = carted & ~removed & checkout
    add(EventType.PURCHASE, bought, end_of + 60 * US_PER_S + step * 1000, qty=qty)

    # Session-level events: a search before the first view, a login after some view.
    n_idx = np.arange(n)
    searched = s.search[rows]
    cols.add(
        type=np.full(int(searched.sum()), list(EventType).index(EventType.SEARCH)),
        sess=n_idx[searched],
        ts=s.start_us[rows][searched],
        item=np.full(int(searched.sum()), -1),
        dwell=np.full(int(searched.sum()), -1),
        scroll=np.full(int(searched.sum()), np.nan),
        qty=np.full(int(searched.sum()), -1),
        query=search_leaf[searched],
    )
    identifies = s.kind[rows] == 1
    login_step = (rng.random(n) * s.views[rows]).astype(np.int64)
    login_view = first_of_session + login_step
    login_ts = view_ts[login_view] + dwell_ms[login_view] * 900
    k = int(identifies.sum())
    cols.add(
        type=np.full(k, list(EventType).index(EventType.IDENTIFY)),
        sess=n_idx[identifies],
        ts=login_ts[identifies],
        item=np.full(k, -1),
        dwell=np.full(k, -1),
        scroll=np.full(k, np.nan),
        qty=np.full(k, -1),
        query=np.full(k, -1),
    )
    ts = (cols.get("ts") // 1000) * 1000  # millisecond precision, like a browser clock
    sess = cols.get("sess")
    row = rows[sess]
    user = s.user[row]
    logged_in = (s.kind[row] == 0) | ((s.kind[row] == 1) & (ts >= login_ts[sess] // 1000 * 1000))
    return _to_table(cat, rng, s, cols, ts, row, np.where(logged_in, user, -1))


def _labels(prefix: str, numbers: np.ndarray, width: int, mask: np.ndarray | None = None) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), width=width, padding="0")
    out = pc.binary_join_element_wise(prefix, digits, "")
    return pc.if_else(pa.array(mask), pa.nulls(len(numbers), pa.string()), out) if mask is not None else out


def _uuids(rng: np.random.Generator, n: int) -> pa.Array:
    """Random (version 4) UUID strings drawn from the seeded generator, so ids repeat for a seed."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexpairs = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    chars = np.ascontiguousarray(hexpairs[raw]).view("S1").reshape(n, 32)
    out = np.full((n, 36), b"-", dtype="S1")
    out[:, [*range(8), *range(9, 13), *range(14, 18), *range(19, 23), *range(24, 36)]] = chars
    return pa.array(np.ascontiguousarray(out).view("S36").ravel()).cast(pa.string())


def _pick(values: list[str], index: np.ndarray) -> pa.Array:
    return pa.array(values).take(pa.array(index, mask=index < 0))


def _to_table(
    cat: Catalog, rng: np.random.Generator, s: Sessions, cols: Columns, ts: np.ndarray, row: np.ndarray, user: np.ndarray
) -> pa.Table:
    session_no = row
    etype = cols.get("type")
    item = cols.get("item")
    n = len(etype)
    stamp = pa.array(ts, pa.timestamp("us", tz="UTC"))
    has_item = item >= 0
    qty = cols.get("qty")
    dwell = cols.get("dwell")
    scroll = cols.get("scroll")
    guest = s.user[row] < 0
    is_cart_page = np.isin(etype, [list(EventType).index(t) for t in (EventType.ADD_TO_CART, EventType.REMOVE_FROM_CART)])
    page = np.select(
        [etype == list(EventType).index(EventType.PURCHASE), is_cart_page, etype == list(EventType).index(EventType.SEARCH),
         etype == list(EventType).index(EventType.CLICK)],
        [3, 2, 1, 4],
        0,
    )
    context_type = EVENT_SCHEMA.field("context").type
    context = pa.StructArray.from_arrays(
        [
            _pick(DEVICES[0], s.device[row]),
            _pick(COUNTRIES[0], s.country[row]),
            _pick(REFERRERS[0], s.referrer[row]),
            _pick(["product", "search", "cart", "checkout", "listing"], page),
            pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()), pa.array([], pa.string())),
        ],
        fields=list(context_type),
    )
    query = cols.get("query")
    return pa.table(
        {
            "event_id": _uuids(rng, n),
            "event_type": _pick([t.value for t in EventType], etype),
            "ts": stamp,
            "received_at": stamp,
            "anonymous_id": pc.if_else(
                pa.array(guest), _labels("g", session_no, 8), _labels("a", np.maximum(s.user[row], 0), 7)
            ),
            "user_id": _labels("u", np.maximum(user, 0), 7, mask=user < 0),
            "session_id": _labels("s", session_no, 8),
            "item_id": cat.labels.take(pa.array(item, mask=~has_item)),
            "quantity": pa.array(qty, mask=qty < 0),
            "price": pa.array(cat.price[np.maximum(item, 0)], mask=~has_item),
            "dwell_ms": pa.array(dwell, mask=dwell < 0),
            "scroll_depth": pa.array(scroll, mask=np.isnan(scroll)),
            "query": pc.utf8_lower(_pick(cat.leaf_names, query)),
            "context": context,
            "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int64)),
        }
    )


# ---------------------------------------------------------------- entry point


def generate(size: str, seed: int, lake: Lake, end_date: date | None = None) -> GenerateSummary:
    """Generate a storefront of `size` and write its catalog and events to `lake`."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    clock = time.perf_counter()
    end = datetime.combine(end_date or DEFAULT_END_DATE, datetime.min.time(), tzinfo=UTC)
    start = end - timedelta(days=spec.days)
    start_us = int(start.timestamp()) * US_PER_S
    end_us = int(end.timestamp()) * US_PER_S

    rng = np.random.default_rng([seed, 1])
    cat = build_catalog(rng, spec.items, start_us, end_us, np.random.default_rng([seed, 3]))
    users = build_users(rng, spec.users, len(cat.leaf_names))
    sessions = build_sessions(rng, users, int(spec.events / EVENTS_PER_SESSION), len(cat.leaf_names), start_us, spec.days)

    summary = GenerateSummary(size=size, seed=seed, start=start, end=end, sessions=len(sessions.start_us))
    lake.write_catalog(cat.table, at=end)
    summary.items = len(cat.leaf)
    summary.new_items = int((cat.created_us >= start_us).sum())
    by_type: Counter[str] = Counter()
    seen_users: set[str] = set()
    # One day of sessions at a time keeps memory bounded; each day has its own seeded stream.
    day_of = (sessions.start_us - start_us) // US_PER_DAY
    bounds = np.searchsorted(day_of, np.arange(spec.days + 1))
    for day in range(spec.days):
        rows = np.arange(bounds[day], bounds[day + 1])
        if len(rows) == 0:
            continue
        day_rng = np.random.default_rng([seed, 2, day])
        table = session_events(cat, day_rng, sessions, rows)
        table = table.filter(pc.less(table["received_at"], pa.scalar(end, pa.timestamp("us", tz="UTC"))))
        summary.files += len(lake.write_events(table))
        summary.events += table.num_rows
        by_type.update(dict(zip(*np.unique(table["event_type"].to_numpy(zero_copy_only=False), return_counts=True), strict=True)))
        seen_users.update(pc.unique(table["user_id"]).drop_null().to_pylist())
    summary.events_by_type = {str(k): int(v) for k, v in by_type.items()}
    summary.users = len(seen_users)
    summary.seconds = time.perf_counter() - clock
    return summary
