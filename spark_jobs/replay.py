"""Point-in-time replay of lake events: ranker requests, their candidates and feature rows.

A request is a moment in a real session (half-way through it): what was known before that moment
fills `common.features.RequestState` and `Candidates`, candidates come from the generators
serving uses (`common.candidates`), and what the person did in the rest of the session labels
them (purchase 3 > add_to_cart 2 > click/view/wishlist 1 > nothing 0). The same requests drive
ranker training, early stopping and the offline evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import numpy as np
import pyarrow as pa

from common.candidates import als_top_n, category_best, covisited, merge_sources
from common.features import DAY_S, POP_DAYS, Candidates, RequestState, day_index, implicit_weight
from common.lake import Lake
from common.model import ModelArtifacts
from common.settings import TrainingSettings
from common.vectors import fold_in
from spark_jobs import tables

LABELS = {"purchase": 3, "add_to_cart": 2, "click": 1, "view": 1, "wishlist": 1}
LOG_COLUMNS = ["event_id", "event_type", "ts", "anonymous_id", "user_id", "session_id", "item_id", "dwell_ms"]
TRENDING_WINDOW_S = DAY_S
ITEM_KEY = 10**13  # > any epoch time in ms until the year 2286; items up to 900k fit in int64


@dataclass
class Request:
    person: str
    session_rows: np.ndarray  # event log rows of the session before the moment, oldest first
    now_s: float
    labels: dict[str, int]  # item -> best thing the person did with it after the moment


@dataclass
class EventLog:
    """Item events received before `end`, identity-resolved, in time order, with lookup indexes."""

    item_ids: list[str]  # vocabulary: catalog items, then any others seen in events
    person: np.ndarray  # str per event
    session: np.ndarray  # str per event
    item: np.ndarray  # int index into item_ids
    event_type: np.ndarray  # str
    ts_s: np.ndarray  # float64 epoch seconds
    weight: np.ndarray  # implicit weight r per event
    raw: pa.Table  # the events as read (for the tables module)
    category: np.ndarray  # per item
    price: np.ndarray  # per item
    created_s: np.ndarray  # per item
    promoted: np.ndarray  # per item
    index: dict[str, int] = field(init=False)  # item id -> position in item_ids
    _id_rank: np.ndarray = field(init=False)  # rank of each item id in string order (deterministic ties)
    _item_time: np.ndarray = field(init=False)
    _by_person: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self._id_rank = np.argsort(np.argsort(np.asarray(self.item_ids, dtype=object)))
        # One sorted int64 key per event, item then time in ms, so a single searchsorted counts any window.
        self._item_time = np.sort(self.item * ITEM_KEY + np.floor(self.ts_s * 1000).astype(np.int64))
        self._by_person = {}
        order = np.lexsort((self.ts_s, self.person))
        persons = self.person[order]
        if len(persons):
            cuts = np.flatnonzero(persons[1:] != persons[:-1]) + 1
            for chunk in np.split(order, cuts):
                self._by_person[str(self.person[chunk[0]])] = chunk

    def before(self, end_s: float) -> pa.Table:
        """The raw events with ts before end_s (for point-in-time tables)."""
        ts = np.asarray(self.raw["ts"].cast(pa.int64()).to_numpy()) / 1e6
        return self.raw.filter(pa.array(ts < end_s))

    def day_counts(self, items: np.ndarray, now_s: float) -> np.ndarray:
        """len(items) x POP_DAYS event counts per UTC day, day(now)-7 .. day(now), only events before now."""
        first_day = day_index(now_s) - (POP_DAYS - 1)
        bounds_ms = np.append(np.arange(first_day, first_day + POP_DAYS) * int(DAY_S) * 1000, int(np.ceil(now_s * 1000)))
        keys = items[:, None] * ITEM_KEY + bounds_ms[None, :]
        cuts = np.searchsorted(self._item_time, keys.ravel()).reshape(keys.shape)
        return np.diff(cuts, axis=1).astype(np.float64)

    def trending(self, now_s: float, n: int) -> list[tuple[str, float]]:
        """The items with the most events in the 24 h before now (ties by item id)."""
        lo, hi = np.searchsorted(self.ts_s, [now_s - TRENDING_WINDOW_S, now_s])
        counts = np.bincount(self.item[lo:hi], minlength=len(self.item_ids))
        top = np.flatnonzero(counts)
        top = top[np.lexsort((self._id_rank[top], -counts[top]))[:n]]
        return [(self.item_ids[i], float(counts[i])) for i in top]

    def person_rows(self, person: str, start_s: float, end_s: float) -> np.ndarray:
        rows = self._by_person.get(person)
        if rows is None:
            return np.zeros(0, dtype=np.int64)
        lo, hi = np.searchsorted(self.ts_s[rows], [start_s, end_s])
        return rows[lo:hi]


def load_log(lake: Lake, end: datetime, training: TrainingSettings) -> EventLog:
    """Read item events received before `end`; a device later identified counts for its user."""
    events = lake.read_events(end=end, columns=LOG_COLUMNS)
    catalog = lake.read_catalog()
    with duckdb.connect() as con:
        con.register("events", events)
        resolved = con.sql(
            """
            WITH alias AS (
                SELECT anonymous_id, user_id FROM (
                    SELECT anonymous_id, user_id,
                           row_number() OVER (PARTITION BY anonymous_id ORDER BY ts DESC, user_id DESC) AS rn
                    FROM events WHERE user_id IS NOT NULL
                ) latest WHERE rn = 1
            )
            SELECT coalesce(e.user_id, a.user_id, e.anonymous_id) AS person_id,
                   coalesce(e.session_id, e.anonymous_id) AS sid,
                   e.item_id, e.event_type, epoch_us(e.ts) / 1e6 AS ts_s, e.dwell_ms
            FROM events e LEFT JOIN alias a USING (anonymous_id)
            WHERE e.item_id IS NOT NULL
            ORDER BY ts_s, e.event_id
            """
        ).to_arrow_table()
    catalog_ids = catalog["item_id"].to_pylist()
    known = set(catalog_ids)
    extra = sorted({i for i in resolved["item_id"].to_pylist() if i not in known})
    item_ids = catalog_ids + extra
    index = {item: i for i, item in enumerate(item_ids)}
    n_extra = len(extra)
    created = catalog["created_at"].cast(pa.int64()).fill_null(0).to_numpy() / 1e6
    types = np.asarray(resolved["event_type"].to_pylist(), dtype=object)
    dwell = resolved["dwell_ms"].to_pylist()
    return EventLog(
        item_ids=item_ids,
        person=np.asarray(resolved["person_id"].to_pylist(), dtype=object),
        session=np.asarray(resolved["sid"].to_pylist(), dtype=object),
        item=np.asarray([index[i] for i in resolved["item_id"].to_pylist()], dtype=np.int64),
        event_type=types,
        ts_s=resolved["ts_s"].to_numpy().astype(np.float64),
        weight=np.asarray([implicit_weight(t, d, training) for t, d in zip(types, dwell, strict=True)]),
        raw=events.filter(pa.array([i is not None for i in events["item_id"].to_pylist()])),
        category=np.asarray(catalog["category"].fill_null("uncategorised").to_pylist() + ["uncategorised"] * n_extra),
        price=np.append(catalog["price"].fill_null(0.0).to_numpy(), np.zeros(n_extra)),
        created_s=np.append(created, np.zeros(n_extra)),
        promoted=np.append(catalog["promoted"].fill_null(False).to_numpy(zero_copy_only=False), np.zeros(n_extra, bool)),
    )


def build_requests(log: EventLog, start_s: float, end_s: float, limit: int, seed: int) -> list[Request]:
    """One request per session whose half-way moment falls in [start_s, end_s) and that goes on after it."""
    order = np.lexsort((log.ts_s, log.session))
    sessions = log.session[order]
    cuts = np.flatnonzero(sessions[1:] != sessions[:-1]) + 1 if len(sessions) else np.zeros(0, dtype=np.int64)
    requests = []
    for rows in np.split(order, cuts):
        if len(rows) < 2:
            continue
        k = len(rows) // 2
        now_s = float(log.ts_s[rows[k]])
        if not start_s <= now_s < end_s:
            continue
        before = rows[log.ts_s[rows] < now_s]
        if len(before) == 0:
            continue
        labels: dict[str, int] = {}
        for r in rows[k:]:
            label = LABELS.get(str(log.event_type[r]), 0)
            item = log.item_ids[log.item[r]]
            if label > labels.get(item, 0):
                labels[item] = label
        if labels:
            requests.append(Request(str(log.person[rows[0]]), before, now_s, labels))
    if len(requests) > limit:
        picked = np.random.default_rng(seed).choice(len(requests), size=limit, replace=False)
        requests = [requests[i] for i in sorted(picked)]
    return requests


@dataclass
class PointInTime:
    """What a request may see: the event log, the dev model, and tables as of the window start."""

    log: EventLog
    model: ModelArtifacts
    training: TrainingSettings
    covis: dict[str, dict[str, float]]
    bestsellers: dict[str, dict[str, float]]
    popular: list[str]  # most popular items in the 7 days before the window (the baseline)

    @classmethod
    def at(cls, log: EventLog, model: ModelArtifacts, training: TrainingSettings, start_s: float, top_n: int) -> PointInTime:
        history = log.before(start_s)
        catalog_table = pa.table({"item_id": log.item_ids, "category": log.category.tolist()})
        recent = log.before(start_s).filter(
            pa.array(np.asarray(history["ts"].cast(pa.int64()).to_numpy()) / 1e6 >= start_s - 7 * DAY_S)
        )
        popular = tables.popularity(recent)["item_id"].to_pylist()
        return cls(
            log=log,
            model=model,
            training=training,
            covis=tables.nested(tables.covisitation(history, top_n), "item_id", "other_id", "count"),
            bestsellers=tables.nested(tables.bestsellers(history, catalog_table, training), "category", "item_id", "score"),
            popular=popular,
        )

    def state(self, request: Request) -> RequestState:
        log = self.log
        session_items: dict[str, float] = {}
        affinity: dict[str, float] = {}
        cart: set[str] = set()
        for r in request.session_rows:
            item = log.item_ids[log.item[r]]
            session_items[item] = float(log.ts_s[r])
            affinity[str(log.category[log.item[r]])] = affinity.get(str(log.category[log.item[r]]), 0.0) + float(log.weight[r])
            if log.event_type[r] == "add_to_cart":
                cart.add(item)
            elif log.event_type[r] == "remove_from_cart":
                cart.discard(item)
        history = log.person_rows(request.person, -np.inf, request.now_s)
        engaged = history[log.weight[history] > 0]
        prices = log.price[log.item[engaged]]
        prices = prices[prices > 0]
        return RequestState(
            now_s=request.now_s,
            user_vector=self.user_vector(request),
            session_items=session_items,
            category_affinity=affinity,
            cart=frozenset(cart),
            typical_price=float(np.median(prices)) if len(prices) else None,
        )

    def user_vector(self, request: Request) -> np.ndarray | None:
        """The batch vector of a known person; else the fold-in of what they did since the model's cutoff."""
        vector = self.model.user_vector(request.person)
        if vector is not None:
            return vector
        log = self.log
        rows = log.person_rows(request.person, self.model.cutoff_s, request.now_s)
        weights: dict[int, float] = {}
        for r in rows:
            j = self.model.item_index.get(log.item_ids[log.item[r]])
            if j is not None and log.weight[r] > 0:
                weights[j] = weights.get(j, 0.0) + float(log.weight[r])
        if not weights:
            return None
        return fold_in(
            self.model.item_factors,
            self.model.yty,
            list(weights),
            list(weights.values()),
            self.training.alpha,
            self.training.regularization,
        )

    def candidates(self, state: RequestState) -> Candidates:
        lists = {}
        sizes = self.training.candidates  # recorded in the manifest: serving builds the same pools
        if state.user_vector is not None:
            lists["als"] = als_top_n(state.user_vector, self.model.scoring_factors, self.model.item_ids, sizes.als)
        lists["covis"] = covisited(state.session_items, self.covis, sizes.covis)
        lists["trending"] = self.log.trending(state.now_s, sizes.trending)
        lists["category"] = category_best(state.category_affinity, self.bestsellers, sizes.category)
        merged = merge_sources(lists)
        return self.describe(list(merged), [merged[i] for i in merged], state)

    def describe(self, item_ids: list[str], sources: list[set[str]], state: RequestState) -> Candidates:
        log, model = self.log, self.model
        rows = np.asarray([log.index.get(i, -1) for i in item_ids], dtype=np.int64)
        known = rows >= 0
        vectors = np.zeros((len(item_ids), model.factors), dtype=np.float32)
        for n, item in enumerate(item_ids):
            j = model.item_index.get(item)
            if j is not None:
                vectors[n] = model.item_factors[j]
        covis = np.asarray(
            [sum(self.covis.get(s, {}).get(item, 0.0) for s in state.session_items) for item in item_ids]
        )
        safe = np.where(known, rows, 0)
        return Candidates(
            item_ids=item_ids,
            sources=sources,
            item_vectors=vectors,
            day_counts=_counts(log, rows, state.now_s),
            covis=covis,
            categories=[str(log.category[r]) if ok else "uncategorised" for r, ok in zip(safe, known, strict=True)],
            prices=np.where(known, log.price[safe], 0.0),
            created_at_s=np.where(known, log.created_s[safe], 0.0),
            promoted=np.where(known, log.promoted[safe], False),
        )


def _counts(log: EventLog, rows: np.ndarray, now_s: float) -> np.ndarray:
    """Day counts, zeros for items the log has never seen (rows of -1)."""
    out = np.zeros((len(rows), POP_DAYS))
    known = rows >= 0
    out[known] = log.day_counts(rows[known], now_s)
    return out
