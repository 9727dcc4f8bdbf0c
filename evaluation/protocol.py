"""Which moments of the test window are scored: the session-based next-item protocol.

The filters follow GRU4Rec's preprocessing (Hidasi et al., ICLR 2016), which most session-based
studies reuse: over the item events up to the window's end, drop sessions of one event, then items
with fewer than 5 events, then sessions left with fewer than 2. Test sessions are those that start
inside the window; their events on items the batch model never saw are dropped, then sessions left
with fewer than 2 events. Before each remaining event past a session's first the system is asked
for a list, and that event's item is the one to find.

One deliberate difference: an event whose item already occurred earlier in the session is replayed
but not scored. Repeats are trivially predictable (in the Online Retail import every add_to_cart is
followed by a purchase of the same line 30 s later) and serving's rules hide cart items, so only the
first time an item enters the session counts as a next item (`Protocol.repeats` scores them too).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common.events import INTEREST_EVENTS

# Item events that express interest; remove_from_cart is replayed but never a target.
SCORED_TYPES = tuple(sorted(INTEREST_EVENTS))
PROTOCOL_COLUMNS = ["event_id", "event_type", "session_id", "item_id", "t"]


@dataclass(frozen=True)
class Protocol:
    min_item_events: int = 5
    min_session_events: int = 2
    repeats: bool = False  # also score events whose item occurred earlier in the session (GRU4Rec's count)


@dataclass
class TestSet:
    """The scored moments, one row per prediction, in replay order."""

    targets: pd.DataFrame  # event_id, session_id, item_id, purchased
    counts: dict[str, int] = field(default_factory=dict)  # what each filter kept, for the report


def select_targets(
    events: pd.DataFrame,
    cutoff_s: float,
    train_items: Collection[str],
    protocol: Protocol = Protocol(),
) -> TestSet:
    """The targets among `events` (columns PROTOCOL_COLUMNS, t = arrival in epoch seconds).

    `events` holds every event up to the window's end, in replay order; `train_items` are the
    items the system can know of: the batch model's, and the catalog's (which includes items new
    since the cutoff, see `mark_new_items`).
    """
    counts: dict[str, int] = {}
    test = _test_events(_filtered(events, protocol, counts), cutoff_s, train_items, protocol, counts)

    repeat = test.duplicated(["session_id", "item_id"], keep="first")
    first = ~test["session_id"].duplicated(keep="first")
    scored = ~first if protocol.repeats else ~repeat & ~first
    counts["repeats"] = int((repeat & ~first).sum())
    bought = test.loc[test["event_type"] == "purchase", ["session_id", "item_id"]].drop_duplicates()
    targets = test[scored].merge(bought.assign(purchased=True), how="left", on=["session_id", "item_id"])
    targets["purchased"] = targets["purchased"].notna()  # True where the merge found a purchase, else NaN
    counts["targets"] = len(targets)
    counts["purchase_targets"] = int(targets["purchased"].sum())
    return TestSet(targets=targets[["event_id", "session_id", "item_id", "purchased"]], counts=counts)


def mark_new_items(test: TestSet, batch_items: Collection[str]) -> TestSet:
    """The targets with a `new_item` column: True where the batch model has no vector for the item (it
    reaches the lists through content vectors, co-visits, trending or new arrivals only)."""
    targets = test.targets.assign(new_item=~test.targets["item_id"].isin(set(batch_items)))
    return TestSet(targets=targets, counts={**test.counts, "new_item_targets": int(targets["new_item"].sum())})


def sample_sessions(test: TestSet, max_sessions: int | None, seed: int) -> TestSet:
    """Keep the targets of `max_sessions` test sessions drawn at random (all of them when None)."""
    sessions = test.targets["session_id"].unique()
    if max_sessions is None or len(sessions) <= max_sessions:
        return test
    chosen = set(np.random.default_rng(seed).choice(np.sort(sessions), size=max_sessions, replace=False))
    targets = test.targets[test.targets["session_id"].isin(chosen)].reset_index(drop=True)
    counts = {**test.counts, "test_sessions_scored": max_sessions, "targets": len(targets)}
    counts["test_sessions_eligible"] = test.counts["test_sessions_scored"]
    counts["purchase_targets"] = int(targets["purchased"].sum())
    return TestSet(targets=targets, counts=counts)


def training_sessions(events: pd.DataFrame, cutoff_s: float, protocol: Protocol = Protocol()) -> list[list[str]]:
    """The item sequences of the sessions whose protocol events all arrived before the cutoff.

    `events` as for `select_targets`. Each session is its items in arrival order, repeats kept; the
    sessions are ordered by their last event, oldest first (ties keep the order they started in).
    """
    data = _filtered(events, protocol, {})
    train = data[data.groupby("session_id", sort=False)["t"].transform("max") < cutoff_s]
    grouped = train.groupby("session_id", sort=False)
    last = grouped["t"].max().sort_values(kind="stable")
    items = grouped["item_id"].agg(list).to_dict()
    return [items[session] for session in last.index]


def target_prefixes(
    events: pd.DataFrame,
    test: TestSet,
    cutoff_s: float,
    train_items: Collection[str],
    protocol: Protocol = Protocol(),
) -> list[list[str]]:
    """Per row of `test.targets`, in order: the items of its session's protocol events before it.

    The protocol events of a test session are those `select_targets` kept (known, frequent items),
    repeats included; `events`, `cutoff_s`, `train_items` and `protocol` must be the ones `test` came from.
    """
    kept = _test_events(_filtered(events, protocol, {}), cutoff_s, train_items, protocol, {})
    position = kept.groupby("session_id", sort=False).cumcount()
    where = dict(zip(kept["event_id"], zip(kept["session_id"], position, strict=True), strict=True))
    items = kept.groupby("session_id", sort=False)["item_id"].agg(list).to_dict()
    prefixes = []
    for event_id in test.targets["event_id"]:
        session, before = where[event_id]
        prefixes.append(items[session][:before])
    return prefixes


def _filtered(events: pd.DataFrame, protocol: Protocol, counts: dict[str, int]) -> pd.DataFrame:
    """The item events with a session after GRU4Rec's filters: sessions of 1, rare items, sessions left short."""
    data = events[events["event_type"].isin(SCORED_TYPES) & events["session_id"].notna()]
    data = data[["event_id", "event_type", "session_id", "item_id", "t"]].reset_index(drop=True)
    counts["item_events"] = len(data)
    counts["sessions"] = data["session_id"].nunique()

    data = _keep_sessions_with(data, protocol.min_session_events)
    data = _keep_items_with(data, protocol.min_item_events)
    data = _keep_sessions_with(data, protocol.min_session_events)
    counts["sessions_after_filters"] = data["session_id"].nunique()
    return data


def _test_events(
    data: pd.DataFrame, cutoff_s: float, train_items: Collection[str], protocol: Protocol, counts: dict[str, int]
) -> pd.DataFrame:
    """The filtered events of sessions starting at or after the cutoff, on known items, sessions of 2+ left."""
    starts = data.groupby("session_id", sort=False)["t"].transform("min")
    test = data[starts >= cutoff_s]
    counts["test_sessions"] = test["session_id"].nunique()
    test = test[test["item_id"].isin(set(train_items))]
    test = _keep_sessions_with(test, protocol.min_session_events)
    counts["test_sessions_scored"] = test["session_id"].nunique()
    counts["test_events"] = len(test)
    return test


def _keep_sessions_with(data: pd.DataFrame, min_events: int) -> pd.DataFrame:
    sizes = data.groupby("session_id", sort=False)["event_id"].transform("size")
    return data[sizes >= min_events]


def _keep_items_with(data: pd.DataFrame, min_events: int) -> pd.DataFrame:
    sizes = data.groupby("item_id", sort=False)["event_id"].transform("size")
    return data[sizes >= min_events]
