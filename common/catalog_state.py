"""Live item state in Redis (stock, price, promotion, category): written by the API's catalog updates.

Changes take effect at once: serving's reads get the OUT_OF_STOCK and PROMOTED sets again whenever the
token written after each change of them differs from the one of the copy a worker holds
(common/read_flags.lua), and the speed layer reads an item's category for session affinity and
bestsellers.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence

import redis

from common import redis_keys
from common.catalog import Item, ItemUpdate
from common.content import ItemContent
from common.redis_server import is_cluster


def apply_item_updates(client: redis.Redis, updates: Sequence[ItemUpdate]) -> int:
    """Write partial item changes in one pipeline and announce them; returns how many were applied."""
    # On one Redis readers never see the hash and the sets disagree; on a cluster they live in other
    # slots (the item's group and the flags' group), so a reader may see one before the other.
    pipe = client.pipeline(transaction=not is_cluster(client))
    for update in updates:
        _queue_fields(pipe, update.item_id, _fields_of_update(update))
    if any(update.in_stock is not None or update.promoted is not None for update in updates):
        _queue_flags_token(pipe)
    for update in updates:
        # As a command: a cluster pipeline refuses its `publish` method (the cluster forwards the message).
        pipe.execute_command("PUBLISH", redis_keys.CATALOG_CHANNEL, update.model_dump_json(exclude_none=True))
    pipe.execute()
    return len(updates)


def load_items(client: redis.Redis, items: Iterable[Item], chunk: int = 5000) -> int:
    """Seed the live state from full catalog records (a snapshot import); returns how many were written."""
    written = 0
    pipe = client.pipeline(transaction=False)
    for item in items:
        fields = _fields_of_update(
            ItemUpdate(
                item_id=item.item_id,
                price=item.price,
                in_stock=item.in_stock,
                promoted=item.promoted,
                title=item.title,
                brand=item.brand,
                category_path=item.category_path,
            )
        )
        fields["category"] = item.category
        _queue_fields(pipe, item.item_id, fields)
        written += 1
        if written % chunk == 0:
            _queue_flags_token(pipe)
            pipe.execute()
    if written % chunk:
        _queue_flags_token(pipe)
    pipe.execute()
    return written


def seed_missing_items(client: redis.Redis, items: Sequence[Item]) -> int:
    """Load snapshot items that have no live state yet, so a restart never undoes a live update."""
    pipe = client.pipeline(transaction=False)
    for item in items:
        pipe.exists(redis_keys.item_state(item.item_id))
    missing = [item for item, present in zip(items, pipe.execute(), strict=True) if not present]
    # A token for the sets an earlier version wrote without one, so serving's copies start to hold.
    client.set(redis_keys.ITEM_FLAGS_TOKEN, secrets.token_hex(8), nx=True)
    return load_items(client, missing) if missing else 0


def _fields_of_update(update: ItemUpdate) -> dict[str, str]:
    fields: dict[str, str] = {}
    if update.price is not None:
        fields["price"] = repr(float(update.price))
    if update.in_stock is not None:
        fields["in_stock"] = "1" if update.in_stock else "0"
    if update.promoted is not None:
        fields["promoted"] = "1" if update.promoted else "0"
    if update.title is not None:
        fields["title"] = update.title
    if update.brand is not None:
        fields["brand"] = update.brand
    if update.category_path:
        fields["category"] = update.category_path[-1]
        fields["category_path"] = json.dumps(update.category_path)
    return fields


def read_contents(client: redis.Redis, item_ids: Sequence[str]) -> dict[str, ItemContent]:
    """item -> its content as the live state holds it (items with no live state are left out)."""
    pipe = client.pipeline(transaction=False)
    for item in item_ids:
        pipe.hgetall(redis_keys.item_state(item))
    return {item: _content(fields) for item, fields in zip(item_ids, pipe.execute(), strict=True) if fields}


def _content(fields: Mapping[bytes, bytes]) -> ItemContent:
    text = {k.decode(): v.decode() for k, v in fields.items()}
    path = json.loads(text["category_path"]) if "category_path" in text else [text.get("category", "")]
    return ItemContent(
        title=text.get("title", ""),
        category_path=tuple(p for p in path if p),
        brand=text.get("brand", ""),
        price=float(text.get("price", 0.0)),
    )


def _queue_flags_token(pipe: redis.client.Pipeline) -> None:
    # After the sets' writes: a reader that sees the new token reads the sets as they are with it, also
    # where the pipeline is no transaction (the three keys share one slot, so their order holds).
    pipe.set(redis_keys.ITEM_FLAGS_TOKEN, secrets.token_hex(8))


def _queue_fields(pipe: redis.client.Pipeline, item_id: str, fields: dict[str, str]) -> None:
    if fields:
        pipe.hset(redis_keys.item_state(item_id), mapping=fields)  # type: ignore[arg-type]
    if "in_stock" in fields:
        if fields["in_stock"] == "1":
            pipe.srem(redis_keys.OUT_OF_STOCK, item_id)
        else:
            pipe.sadd(redis_keys.OUT_OF_STOCK, item_id)
    if "promoted" in fields:
        if fields["promoted"] == "1":
            pipe.sadd(redis_keys.PROMOTED, item_id)
        else:
            pipe.srem(redis_keys.PROMOTED, item_id)
