"""The item catalog as serving sees it: loaded once from the lake's newest snapshot, updated in place."""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import compress, islice
from operator import attrgetter

from common.catalog import UNCATEGORISED, ItemUpdate
from common.content import ItemContent, content_of_row
from common.lake import Lake

_IN_STOCK = attrgetter("in_stock")


@dataclass(frozen=True)
class ItemInfo:
    item_id: str
    title: str
    category: str
    price: float
    created_at_s: float
    in_stock: bool
    promoted: bool
    category_path: tuple[str, ...] = ()
    brand: str = ""

    @property
    def content(self) -> ItemContent:
        return ItemContent(self.title, self.category_path, self.brand, self.price)

    @property
    def label(self) -> str:
        """How an item is named in a human reason."""
        return self.title or self.item_id


class CatalogView:
    """item_id -> ItemInfo. Readers take plain dict lookups; writers replace whole entries."""

    def __init__(self, items: dict[str, ItemInfo]) -> None:
        self._items = items
        self._lock = threading.Lock()
        # Newest first, and their negated creation times (ascending, for bisect): one tuple, replaced whole,
        # so a reader never pairs one version's entries with another's times.
        self._newest: tuple[list[ItemInfo], list[float]] = ([], [])
        self.promoted: frozenset[str] = frozenset()  # the promoted items' ids (few): membership, not a lookup
        self._reindex()

    @classmethod
    def from_lake(cls, lake: Lake) -> CatalogView:
        table = lake.read_catalog()
        items: dict[str, ItemInfo] = {}
        for row in table.to_pylist():
            created = row.get("created_at")
            items[row["item_id"]] = ItemInfo(
                item_id=row["item_id"],
                title=row.get("title") or "",
                category=row.get("category") or UNCATEGORISED,
                price=float(row.get("price") or 0.0),
                created_at_s=created.timestamp() if created else 0.0,
                in_stock=row.get("in_stock") is not False,
                promoted=bool(row.get("promoted")),
                category_path=content_of_row(row).category_path,
                brand=row.get("brand") or "",
            )
        return cls(items)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> ItemInfo | None:
        return self._items.get(item_id)

    def get_many(self, item_ids: Iterable[str]) -> list[ItemInfo | None]:
        """`get` of each item, in one C-level pass (a request looks up its whole pool)."""
        return list(map(self._items.get, item_ids))

    def category(self, item_id: str) -> str:
        info = self._items.get(item_id)
        return info.category if info else UNCATEGORISED

    def newest(self, since_s: float, n: int) -> list[ItemInfo]:
        """In-stock items created after `since_s`, newest first."""
        newest, ages = self._newest
        # The entries created since then lead `newest`; the first n in stock of them, filtered at C level.
        recent = newest[: bisect_right(ages, -since_s)]
        return list(islice(compress(recent, map(_IN_STOCK, recent)), max(n, 0)))

    def add(self, infos: list[ItemInfo]) -> None:
        """Add or replace whole entries (the replay's items as they are created)."""
        with self._lock:
            self._items.update({info.item_id: info for info in infos})
            self._reindex()

    def contents(self, item_ids: list[str] | None = None) -> dict[str, ItemContent]:
        """item -> its content, for `item_ids` (default: every item)."""
        with self._lock:
            ids = list(self._items) if item_ids is None else item_ids
            return {i: info.content for i in ids if (info := self._items.get(i)) is not None}

    def apply(self, updates: list[ItemUpdate]) -> None:
        """Apply partial updates (unknown items are added) so this worker sees them at once. The cost
        follows the updates, not the catalog: only an added item sorts the newest again (a stock feed,
        one message an item, sorted all 50k items at each: ~16 ms of a worker's CPU, the GIL held)."""
        with self._lock:
            added = False
            changed: dict[str, ItemInfo] = {}
            for update in updates:
                current = self._items.get(update.item_id)
                if current is None:
                    added = True
                    current = ItemInfo(update.item_id, "", UNCATEGORISED, 0.0, datetime.now(UTC).timestamp(), True, False)
                changes: dict[str, object] = {}
                if update.price is not None:
                    changes["price"] = update.price
                if update.in_stock is not None:
                    changes["in_stock"] = update.in_stock
                if update.promoted is not None:
                    changes["promoted"] = update.promoted
                if update.title is not None:
                    changes["title"] = update.title
                if update.category_path:
                    changes["category"] = update.category_path[-1]
                    changes["category_path"] = tuple(update.category_path)
                if update.brand is not None:
                    changes["brand"] = update.brand
                self._items[update.item_id] = changed[update.item_id] = replace(current, **changes)  # type: ignore[arg-type]
            if added:
                self._reindex()
            else:
                self._refresh(changed)

    def _refresh(self, changed: dict[str, ItemInfo]) -> None:
        """The newest's entries and the promoted set after changes to known items, whose creation times
        (the newest's order) no update changes."""
        newest, ages = self._newest
        self._newest = ([changed.get(info.item_id, info) for info in newest], ages)
        self.promoted = self.promoted.difference(changed).union(i for i, info in changed.items() if info.promoted)

    def _reindex(self) -> None:
        # Newest first, ties by item id: the order ranker training gives new arrivals (spark_jobs/replay.py).
        newest = sorted(self._items.values(), key=lambda i: (-i.created_at_s, i.item_id))[:2000]
        self._newest = (newest, [-info.created_at_s for info in newest])
        self.promoted = frozenset(item for item, info in self._items.items() if info.promoted)
