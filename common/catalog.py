"""The item catalog: one typed record per item, stored as Parquet snapshots in the lake."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from common.ids import Id


class Item(BaseModel):
    """A sellable item. `category` is the leaf of `category_path` and the unit of diversity and affinity."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    title: Annotated[str, StringConstraints(max_length=256)] = ""
    category_path: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=8
    )
    brand: Annotated[str, StringConstraints(max_length=128)] | None = None
    price: float = Field(0.0, ge=0, le=1_000_000)
    in_stock: bool = True
    promoted: bool = False
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def category(self) -> str:
        return self.category_path[-1] if self.category_path else "uncategorised"


class ItemUpdate(BaseModel):
    """A partial change that takes effect at once (stock, price, promotion)."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    price: float | None = Field(None, ge=0, le=1_000_000)
    # Strict: 0, 1, "yes" or "false" are refused, not read as booleans (a wrong client is told, not obeyed).
    in_stock: StrictBool | None = None
    promoted: StrictBool | None = None
    title: str | None = None
    category_path: list[str] | None = None
    brand: str | None = None

    @property
    def changes_content(self) -> bool:
        """Whether the item's content vector (common/content.py) may change."""
        return any(v is not None for v in (self.title, self.category_path, self.brand, self.price))


CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("category_path", pa.list_(pa.string())),
        pa.field("category", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("in_stock", pa.bool_()),
        pa.field("promoted", pa.bool_()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


def items_to_table(items: Iterable[Item]) -> pa.Table:
    rows = [{**item.model_dump(), "category": item.category} for item in items]
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)


def table_to_items(table: pa.Table) -> list[Item]:
    return [Item.model_validate({k: v for k, v in row.items() if k != "category"}) for row in table.to_pylist()]
