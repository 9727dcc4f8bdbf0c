"""The item catalog: one typed record per item, stored as Parquet snapshots in the lake."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from common.ids import Id

# An item's bounded fields, shared by the catalog record and the live update (and so by the OpenAPI).
UNCATEGORISED = "uncategorised"  # the category of an item without a category path
MAX_TITLE = 256
MAX_CATEGORY_NAME = 64
MAX_CATEGORY_DEPTH = 8
MAX_BRAND = 128
MAX_PRICE = 1_000_000

Title = Annotated[str, StringConstraints(max_length=MAX_TITLE)]
CategoryPath = Annotated[
    list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CATEGORY_NAME)]],
    Field(max_length=MAX_CATEGORY_DEPTH, description="From the top category to the leaf."),
]
Brand = Annotated[str, StringConstraints(max_length=MAX_BRAND)]
# Strict: true/false are refused as prices (lax parsing would read them as 1.0/0.0).
Price = Annotated[float, Field(ge=0, le=MAX_PRICE, strict=True)]


class Item(BaseModel):
    """A sellable item. `category` is the leaf of `category_path` and the unit of diversity and affinity."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    title: Title = ""
    category_path: CategoryPath = Field(default_factory=list)
    brand: Brand | None = None
    price: Price = 0.0
    in_stock: bool = True
    promoted: bool = False
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def category(self) -> str:
        return self.category_path[-1] if self.category_path else UNCATEGORISED


class ItemUpdate(BaseModel):
    """A partial change that takes effect at once (stock, price, promotion)."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    price: Price | None = None
    # Strict: 0, 1, "yes" or "false" are refused, not read as booleans (a wrong client is told, not obeyed).
    in_stock: StrictBool | None = None
    promoted: StrictBool | None = None
    title: Title | None = None
    category_path: CategoryPath | None = None
    brand: Brand | None = None

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
