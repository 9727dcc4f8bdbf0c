"""Point-in-time replay of lake events: ranker requests, their candidates and feature rows.

A request is a moment inside a real session, just before an event whose item is new to the session
(what `recs evaluate replay` scores). What was known before that moment fills
`common.features.RequestState`, and `common.gatherer` (the code serving runs) builds the candidate
pool and its feature inputs from lookups backed by the event log (`EventLogLookups`). Labels: the
next new item 1 (2 when the session buys it), every other candidate 0, repeats included: what the
person already has is a feature, not a label. (Labelling the session's later new items 1 as well,
the next one 2, cost 0.009 of MRR@20 on a click export's held-out day and gained nothing on HR@20.)
The same requests drive ranker training, early stopping and the offline evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import duck
from common.candidates import Scored
from common.catalog import UNCATEGORISED
from common.content import ItemContent, content_of_row
from common.events import ATTENTION_EVENTS, BESTSELLER_EVENTS, INTEREST_EVENTS
from common.features import (
    DAY_S,
    POP_DAYS,
    Candidates,
    RequestState,
    day_index,
    implicit_weight,
    with_purchases_since,
)
from common.gatherer import Gathered, ItemColumns, describe, gather_lists, pool
from common.lake import Lake
from common.model import ModelArtifacts
from common.neighbours import NeighbourIndex, score_neighbours, session_token
from common.sequence import SEQUENCE_EXCLUDED_TYPES, SequenceCounter, heaviest, newest
from common.settings import SpeedSettings, TrainingSettings
from common.speed_state import forward_decay, trending_decay_weights
from common.vectors import fold_in
from spark_jobs import tables

NEXT_ITEM, NEXT_ITEM_BOUGHT = 1, 2
LOG_COLUMNS = ["event_id", "event_type", "ts", "anonymous_id", "user_id", "session_id", "item_id", "dwell_ms", "quantity"]
ITEM_KEY = 10**13  # > any epoch time in ms until the year 2286; items up to 900k fit in int64


@dataclass
class Request:
    person: str
    session_rows: np.ndarray  # event log rows of the session before the moment, oldest first
    now_s: float
    at: int  # log row of the event just after the moment: the log before it is what may be known
    target: str  # the next new item of the session (what the replay evaluation scores)
    labels: dict[str, int]  # item -> relevance (module docstring)


@dataclass
class EventLog:
    """Item events received before `end`, identity-resolved, in time order, with lookup indexes."""

    item_ids: list[str]  # vocabulary: catalog items, then any others seen in events
    person: np.ndarray  # str per event
    session: np.ndarray  # str per event: the session id, else the device
    session_id: np.ndarray  # str per event: the session id as the speed layer keys it ("_" when none)
    item: np.ndarray  # int index into item_ids
    event_type: np.ndarray  # str
    ts_s: np.ndarray  # float64 epoch seconds
    weight: np.ndarray  # implicit weight r per event
    quantity: np.ndarray  # per event (1 where none was sent)
    raw: pa.Table  # the events as read (for the tables module)
    category: np.ndarray  # per item; '' where the catalog has none (the speed layer's category then)
    price: np.ndarray  # per item
    created_s: np.ndarray  # per item; inf for items missing from the catalog
    promoted: np.ndarray  # per item
    contents: dict[str, ItemContent] = field(default_factory=dict)  # catalog items with text (common/content.py)
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
        bounds_ms = np.append(np.arange(first_day, first_day + POP_DAYS) * int(DAY_S) * 1000, int(np.floor(now_s * 1000)))  # events before now: not the one at now
        keys = items[:, None] * ITEM_KEY + bounds_ms[None, :]
        cuts = np.searchsorted(self._item_time, keys.ravel()).reshape(keys.shape)
        return np.diff(cuts, axis=1).astype(np.float64)

    def trending(self, now_s: float, n: int, speed: SpeedSettings) -> list[tuple[str, float]]:
        """The speed layer's trending list at `now_s`: implicit weights per time bucket, buckets decayed
        by age (`common.speed_state.trending_decay_weights`); ties as Redis's ZREVRANGE (id descending)."""
        weights = trending_decay_weights(now_s, speed.trending_bucket_s, speed.trending_window_s, speed.trending_half_life_s)
        lo, hi = np.searchsorted(self.ts_s, [min(weights), now_s])
        starts = (self.ts_s[lo:hi] // speed.trending_bucket_s) * speed.trending_bucket_s
        buckets, bucket_of = np.unique(starts, return_inverse=True)  # a few dozen buckets, thousands of events
        per_event = self.weight[lo:hi] * np.array([weights.get(int(b), 0.0) for b in buckets])[bucket_of]
        scores = np.bincount(self.item[lo:hi], weights=per_event, minlength=len(self.item_ids))
        top = np.flatnonzero(scores > 0)
        top = top[np.lexsort((-self._id_rank[top], -scores[top]))[:n]]
        return [(self.item_ids[i], float(scores[i])) for i in top]

    def person_rows(self, person: str, start_s: float, end_s: float) -> np.ndarray:
        rows = self._by_person.get(person)
        if rows is None:
            return np.zeros(0, dtype=np.int64)
        lo, hi = np.searchsorted(self.ts_s[rows], [start_s, end_s])
        return rows[lo:hi]


def load_log(lake: Lake, end: datetime, training: TrainingSettings) -> EventLog:
    """Read item events received before `end` (attention events are none: see ATTENTION_EVENTS); a device
    later identified counts for its user."""
    events = lake.read_events(end=end, columns=LOG_COLUMNS)
    attention = ", ".join(f"'{t}'" for t in sorted(ATTENTION_EVENTS))
    catalog = lake.read_catalog()
    with duck.connect() as con:
        con.register("events", events)
        resolved = con.sql(
            f"""
            WITH alias AS (
                SELECT anonymous_id, user_id FROM (
                    SELECT anonymous_id, user_id,
                           row_number() OVER (PARTITION BY anonymous_id ORDER BY ts DESC, user_id DESC) AS rn
                    FROM events WHERE user_id IS NOT NULL
                ) latest WHERE rn = 1
            )
            SELECT coalesce(e.user_id, a.user_id, e.anonymous_id) AS person_id,
                   coalesce(e.session_id, e.anonymous_id) AS sid,
                   coalesce(e.session_id, '_') AS raw_session,
                   e.item_id, e.event_type, epoch_us(e.ts) / 1e6 AS ts_s, e.dwell_ms,
                   coalesce(e.quantity, 1) AS quantity
            FROM events e LEFT JOIN alias a USING (anonymous_id)
            WHERE e.item_id IS NOT NULL AND e.event_type NOT IN ({attention})
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
    types = _shared_strings(resolved["event_type"])
    dwell = resolved["dwell_ms"].to_pylist()
    return EventLog(
        item_ids=item_ids,
        person=_shared_strings(resolved["person_id"]),
        session=_shared_strings(resolved["sid"]),
        session_id=_shared_strings(resolved["raw_session"]),
        item=_positions(resolved["item_id"], index),
        event_type=types,
        ts_s=resolved["ts_s"].to_numpy().astype(np.float64),
        weight=np.asarray([implicit_weight(t, d, training) for t, d in zip(types, dwell, strict=True)]),
        quantity=resolved["quantity"].to_numpy().astype(np.float64),
        raw=events.filter(
            pc.and_(pc.is_valid(events["item_id"]), pc.invert(pc.is_in(events["event_type"], pa.array(sorted(ATTENTION_EVENTS)))))
        ),
        category=np.asarray(catalog["category"].fill_null("").to_pylist() + [""] * n_extra),
        price=np.append(catalog["price"].fill_null(0.0).to_numpy(), np.zeros(n_extra)),
        created_s=np.append(created, np.full(n_extra, np.inf)),  # not in the catalog: no creation time
        promoted=np.append(catalog["promoted"].fill_null(False).to_numpy(zero_copy_only=False), np.zeros(n_extra, bool)),
        contents={row["item_id"]: c for row in catalog.to_pylist() if (c := content_of_row(row)).has_text},
    )


def _distinct(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(the column's distinct values, each row's position among them); the column has no nulls."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False)


def _shared_strings(column: pa.ChunkedArray) -> np.ndarray:
    """The column as an object array in which equal values are one str, not one a row: a person's,
    a session's and a type's rows repeat them (3.7M events held 2.8 GB as a str a row)."""
    if column.null_count:
        return np.asarray(column.to_pylist(), dtype=object)
    values, rows = _distinct(column)
    return np.asarray(values, dtype=object)[rows]


def _positions(column: pa.ChunkedArray, index: Mapping[str, int]) -> np.ndarray:
    """Each row's position in `index`, looked up once per distinct value (every value is in it)."""
    values, rows = _distinct(column)
    return np.fromiter(map(index.__getitem__, values), np.int64, len(values))[rows]


def build_requests(log: EventLog, start_s: float, end_s: float, limit: int, seed: int) -> list[Request]:
    """The moments before each event in [start_s, end_s) whose item is new to its session (never a
    session's first event), a seeded sample of `limit` of them, in log order."""
    order = np.lexsort((np.arange(len(log.ts_s)), log.session))  # by session, then log order
    sessions = log.session[order]
    cuts = np.flatnonzero(sessions[1:] != sessions[:-1]) + 1 if len(sessions) else np.zeros(0, dtype=np.int64)
    requests = []
    for rows in np.split(order, cuts):
        rows = rows[[str(log.event_type[r]) in INTEREST_EVENTS for r in rows]]
        if len(rows) < 2:
            continue
        bought = {int(log.item[r]) for r in rows if log.event_type[r] == "purchase"}
        first_at: dict[int, int] = {}
        for position, r in enumerate(rows):
            first_at.setdefault(int(log.item[r]), position)
        for position in sorted(first_at.values()):
            r = rows[position]
            if position == 0 or not start_s <= log.ts_s[r] < end_s:
                continue
            item = int(log.item[r])
            labels = {log.item_ids[item]: NEXT_ITEM_BOUGHT if item in bought else NEXT_ITEM}
            requests.append(
                Request(str(log.person[r]), rows[:position], float(log.ts_s[r]), int(r), log.item_ids[item], labels)
            )
    if len(requests) > limit:
        picked = np.random.default_rng(seed).choice(len(requests), size=limit, replace=False)
        requests = [requests[i] for i in picked]
    return sorted(requests, key=lambda request: request.at)


@dataclass
class PointInTime:
    """What a request may see: the event log up to its moment and the dev model.

    Requests must be asked in log order (`build_requests` returns them so): what the speed layer
    keeps live (ordered co-visits, `common.sequence`; forward-decayed category bestsellers) is
    counted forward through the log as they go, by the speed layer's rules. With `content_vectors`,
    a catalog item the model has no batch vector for gets its content vector once it is created, as
    serving's catalog gives it one (`ModelArtifacts.with_content_vectors`, the same code): its ALS
    score, the fold-in of its events and its candidacy in the ALS list are then serving's.
    """

    log: EventLog
    model: ModelArtifacts
    training: TrainingSettings
    speed: SpeedSettings
    popular: list[str]  # most popular items in the 7 days before the window (the baseline)
    content_vectors: bool = False
    sequences: SequenceCounter = field(init=False)
    neighbour_index: NeighbourIndex = field(init=False)
    # category -> item -> forward-decayed weight (`common.speed_state.forward_decay`), as the speed layer's sets
    _bestsellers: defaultdict[str, defaultdict[str, float]] = field(init=False)
    _cursor: int = field(default=0, init=False)  # log rows before this one are counted
    _arrivals: list[int] = field(default_factory=list, init=False)  # log items due a content vector, oldest first

    def __post_init__(self) -> None:
        speed = self.speed
        self.sequences = SequenceCounter(steps=speed.covis_steps, recent_n=speed.recent_items, top_n=speed.covis_top_n)
        self.neighbour_index = NeighbourIndex(
            speed.neighbour_sessions_per_item, speed.recent_items, speed.neighbour_session_ttl_s
        )
        self._bestsellers = defaultdict(lambda: defaultdict(float))
        if self.content_vectors and self.model.content_map is not None:
            log = self.log
            due = [log.index[item] for item in log.contents if not self.model.has_batch_vector(item)]
            self._arrivals = sorted(due, key=lambda i: (log.created_s[i], log.item_ids[i]))

    @classmethod
    def at(
        cls,
        log: EventLog,
        model: ModelArtifacts,
        training: TrainingSettings,
        speed: SpeedSettings,
        start_s: float,
        content_vectors: bool = False,
    ) -> PointInTime:
        history = log.before(start_s)
        recent = history.filter(
            pa.array(np.asarray(history["ts"].cast(pa.int64()).to_numpy()) / 1e6 >= start_s - 7 * DAY_S)
        )
        popular = tables.popularity(recent)["item_id"].to_pylist()
        return cls(log=log, model=model, training=training, speed=speed, popular=popular, content_vectors=content_vectors)

    def advance(self, to_row: int) -> None:
        """Count the log's events before `to_row` as the speed layer would have applied them."""
        log, half_life = self.log, self.speed.bestsellers_half_life_s
        for r in range(self._cursor, to_row):
            kind, item = str(log.event_type[r]), int(log.item[r])
            if kind not in SEQUENCE_EXCLUDED_TYPES:
                # A session is the speed layer's: one person's session id (its token names it).
                token = session_token(str(log.person[r]), str(log.session_id[r]))
                if self.sequences.add(token, log.item_ids[item], float(log.ts_s[r])):
                    self.neighbour_index.add(token, log.item_ids[item], float(log.ts_s[r]))
            category = str(log.category[item])
            if kind in BESTSELLER_EVENTS and category:
                weight = log.weight[r] * log.quantity[r] * forward_decay(float(log.ts_s[r]), half_life)
                self._bestsellers[category][log.item_ids[item]] += float(weight)
        self._cursor = max(self._cursor, to_row)

    def add_arrivals(self, now_s: float) -> None:
        """Content vectors for the catalog items created by `now_s` (serving adds them at their PUT)."""
        log, due = self.log, 0
        while due < len(self._arrivals) and log.created_s[self._arrivals[due]] <= now_s:
            due += 1
        if due:
            added, self._arrivals = self._arrivals[:due], self._arrivals[due:]
            self.model = self.model.with_content_vectors({log.item_ids[i]: log.contents[log.item_ids[i]] for i in added})

    def bestsellers(self, category: str, n: int, now_s: float) -> dict[str, float]:
        """A category's top n items, decayed to `now_s` (ties as Redis's ZREVRANGE: id descending)."""
        row: dict[str, float] = self._bestsellers.get(category, {})
        scale = 1.0 / forward_decay(now_s, self.speed.bestsellers_half_life_s)
        return {item: weight * scale for item, weight in heaviest(row, n, ties_descending=True).items() if weight > 0}

    def state(self, request: Request) -> RequestState:
        """What the speed layer would hold for the request (recent items, decayed affinity, cart)."""
        self.add_arrivals(request.now_s)  # before the fold-in: a new item's events fold in its content vector
        log, speed = self.log, self.speed
        session_items: dict[str, float] = {}
        affinity: dict[str, float] = {}
        cart: set[str] = set()
        for r in request.session_rows:
            item = log.item_ids[log.item[r]]
            if log.event_type[r] not in SEQUENCE_EXCLUDED_TYPES:
                session_items[item] = max(session_items.get(item, -np.inf), float(log.ts_s[r]))
            category = str(log.category[log.item[r]])
            if log.weight[r] > 0 and category:
                decay = 2.0 ** ((float(log.ts_s[r]) - request.now_s) / speed.affinity_half_life_s)
                affinity[category] = affinity.get(category, 0.0) + float(log.weight[r]) * decay
            if log.event_type[r] == "add_to_cart":
                cart.add(item)
            elif log.event_type[r] in ("remove_from_cart", "purchase"):
                cart.discard(item)
        recent = newest(session_items, speed.recent_items)
        history = log.person_rows(request.person, request.now_s - speed.history_ttl_s, request.now_s)
        engaged = {int(log.item[r]) for r in history if log.weight[r] > 0} | {log.index[i] for i in recent}
        bought: dict[str, float] = {}
        for r in history[log.event_type[history] == "purchase"]:
            bought[log.item_ids[log.item[r]]] = float(log.ts_s[r])
        purchases = dict(sorted(bought.items(), key=lambda kv: (kv[1], kv[0]))[-speed.purchases_kept :])
        prices = log.price[sorted(engaged)] if engaged else np.zeros(0)
        prices = prices[prices > 0]
        return RequestState(
            now_s=request.now_s,
            user_vector=self.user_vector(request),
            session_items=recent,
            category_affinity=affinity,
            cart=frozenset(cart),
            purchases=purchases,
            typical_price=float(np.median(prices)) if len(prices) else None,
            history=with_purchases_since(self.model.history_of(request.person), purchases, self.model.cutoff_s),
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

    def gather(self, request: Request, state: RequestState) -> tuple[Gathered, Candidates]:
        """The request's candidate lists and the whole pool's feature inputs, as serving builds them."""
        self.advance(request.at)
        self.add_arrivals(request.now_s)
        lookups = EventLogLookups(self, request.now_s, session_token(request.person, str(self.log.session_id[request.at])))
        gathered = gather_lists(self.model, lookups, state, self.training.candidates, state.session_items)
        item_ids, sources = pool(gathered)
        return gathered, describe(self.model, lookups, gathered, item_ids, sources)


@dataclass
class EventLogLookups:
    """Training's backend of `common.gatherer.Lookups`: the event log before one moment."""

    pit: PointInTime
    now_s: float
    own_token: str  # the request's session (common.neighbours.session_token), never its own neighbour

    def covisitation(self, seeds: Collection[str]) -> Mapping[str, Mapping[str, float]]:
        rows = {seed: self.pit.sequences.top_row(seed) for seed in seeds}
        return {seed: row for seed, row in rows.items() if row}

    def trending(self, n: int) -> Scored:
        return self.pit.log.trending(self.now_s, n, self.pit.speed)

    def neighbours(self, session_items: Mapping[str, float], n: int) -> Scored:
        index, sizes = self.pit.neighbour_index, self.pit.training.candidates
        return score_neighbours(
            session_items, index.rows(session_items, self.now_s), lambda token: index.session(token, self.now_s),
            self.own_token, sizes.neighbour_sample, sizes.neighbour_k, n,
        )  # fmt: skip

    def bestsellers(self, categories: Sequence[str], n: int) -> Mapping[str, Mapping[str, float]]:
        found = {c: self.pit.bestsellers(c, n, self.now_s) for c in categories}
        return {c: row for c, row in found.items() if row}

    def new_arrivals(self, since_s: float, n: int) -> Scored:
        log = self.pit.log
        fresh = np.flatnonzero((log.created_s >= since_s) & (log.created_s < self.now_s))
        fresh = fresh[np.lexsort((log._id_rank[fresh], -log.created_s[fresh]))][:n]  # ties by id, as serving
        return [(log.item_ids[i], float(log.created_s[i])) for i in fresh]

    def day_counts(self, items: Sequence[str]) -> np.ndarray:
        log = self.pit.log
        return _counts(log, np.asarray([log.index.get(i, -1) for i in items], dtype=np.int64), self.now_s)

    def items(self, items: Sequence[str]) -> ItemColumns:
        log = self.pit.log
        rows = np.asarray([log.index.get(i, -1) for i in items], dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        created = log.created_s[safe]
        return ItemColumns(
            # Serving's catalog view names a missing category so (common.catalog.UNCATEGORISED).
            categories=[str(log.category[r]) or UNCATEGORISED if ok else UNCATEGORISED for r, ok in zip(safe, known, strict=True)],
            prices=np.where(known, log.price[safe], 0.0),
            # Serving dates an item missing from its catalog now; so does training.
            created_at_s=np.where(known & np.isfinite(created), created, self.now_s),
            promoted=np.where(known, log.promoted[safe], False),
        )


def _counts(log: EventLog, rows: np.ndarray, now_s: float) -> np.ndarray:
    """Day counts, zeros for items the log has never seen (rows of -1)."""
    out = np.zeros((len(rows), POP_DAYS))
    known = rows >= 0
    out[known] = log.day_counts(rows[known], now_s)
    return out
