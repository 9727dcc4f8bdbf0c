"""The item catalog as serving sees it: loaded once from the lake's newest snapshot, updated in place."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from common.catalog import ItemUpdate
from common.lake import Lake

UNCATEGORISED = "uncategorised"


@dataclass(frozen=True)
class ItemInfo:
    item_id: str
    title: str
    category: str
    price: float
    created_at_s: float
    in_stock: bool
    promoted: bool

    @property
    def label(self) -> str:
        """How an item is named in a human reason."""
        return self.title or self.item_id


class CatalogView:
    """item_id -> ItemInfo. Readers take plain dict lookups; writers replace whole entries."""

    def __init__(self, items: dict[str, ItemInfo]) -> None:
        self._items = items
        self._lock = threading.Lock()
        self._newest: list[ItemInfo] = []
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
            )
        return cls(items)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_id: str) -> ItemInfo | None:
        return self._items.get(item_id)

    def category(self, item_id: str) -> str:
        info = self._items.get(item_id)
        return info.category if info else UNCATEGORISED

    def newest(self, since_s: float, n: int) -> list[ItemInfo]:
        """In-stock items created after `since_s`, newest first."""
        out: list[ItemInfo] = []
        for info in self._newest:
            if info.created_at_s < since_s or len(out) >= n:
                break
            if info.in_stock:
                out.append(info)
        return out

    def apply(self, updates: list[ItemUpdate]) -> None:
        """Apply partial updates (unknown items are added) so this worker sees them at once."""
        with self._lock:
            for update in updates:
                current = self._items.get(update.item_id) or ItemInfo(
                    update.item_id, "", UNCATEGORISED, 0.0, datetime.now(UTC).timestamp(), True, False
                )
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
                self._items[update.item_id] = replace(current, **changes)  # type: ignore[arg-type]
            self._reindex()

    def _reindex(self) -> None:
        # Newest first, ties by item id: the order ranker training gives new arrivals (spark_jobs/replay.py).
        self._newest = sorted(self._items.values(), key=lambda i: (-i.created_at_s, i.item_id))[:2000]
