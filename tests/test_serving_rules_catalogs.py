"""Business rules on a catalog without categories (a store importing bare click logs): every rule
still lets a list fill its k places when the pool holds k items."""

from __future__ import annotations

import random

from common.catalog import ItemUpdate
from serving.core.catalog_view import UNCATEGORISED, CatalogView, ItemInfo
from serving.core.recommender import _pick
from serving.core.rules import Diversity, NewArrivals, Rules

K = 20


def rows(n: int, category: str = UNCATEGORISED, new: set[int] | None = None) -> list[tuple[str, float, set[str], bool, str]]:
    """n pool rows, best first; `new` marks positions proposed as new arrivals."""
    return [
        (f"i{j}", 1.0 - j / n, {"new"} if new and j in new else {"covis"}, False, category) for j in range(n)
    ]


def test_the_category_cap_skips_items_without_a_category() -> None:
    picked = _pick(Rules(diversity=Diversity(max_share_per_category=0.1)), rows(50), K)
    assert len(picked) == K
    assert [r[0] for r in picked] == [f"i{j}" for j in range(K)]  # the best k, in order


def test_the_cap_is_a_share_of_k_for_categorised_items() -> None:
    one_category = rows(50, category="shoes")
    assert len(_pick(Rules(), one_category, K)) == K  # the default: no cap
    half = Rules(diversity=Diversity(max_share_per_category=0.5))
    assert len(_pick(half, one_category, K)) == half.diversity.cap(K) == 10
    strict = Rules(diversity=Diversity(max_share_per_category=0.15))
    assert len(_pick(strict, one_category, K)) == 3
    assert len(_pick(strict, one_category + rows(50)[:30], K)) == K  # uncategorised items fill the rest


def test_the_new_arrival_quota_keeps_k_items_on_a_catalog_without_categories() -> None:
    pool = rows(40, new={35, 36})
    picked = _pick(Rules(new_arrivals=NewArrivals(reserved_slots=2)), pool, K)
    assert len(picked) == K
    assert {"i35", "i36"} <= {r[0] for r in picked}


def test_a_short_pool_gives_every_item_it_has() -> None:
    assert len(_pick(Rules(), rows(7), K)) == 7


def test_newest_gives_in_stock_items_created_since_newest_first_at_most_n() -> None:
    def info(item: str, created: float, in_stock: bool = True) -> ItemInfo:
        return ItemInfo(item, "", UNCATEGORISED, 1.0, created, in_stock, False)

    catalog = CatalogView({i.item_id: i for i in [info("a", 10.0), info("b", 30.0), info("c", 20.0, in_stock=False),
                                                  info("d", 20.0), info("e", 5.0)]})  # fmt: skip
    assert [i.item_id for i in catalog.newest(10.0, 10)] == ["b", "d", "a"]  # created at since_s counts; c is out
    assert [i.item_id for i in catalog.newest(10.0, 2)] == ["b", "d"]
    assert [i.item_id for i in catalog.newest(31.0, 10)] == []
    assert catalog.newest(0.0, 0) == []
    catalog.add([info("f", 40.0), info("g", 40.0)])  # ties by id
    assert [i.item_id for i in catalog.newest(25.0, 10)] == ["f", "g", "b"]


def test_updates_leave_the_newest_and_the_promoted_as_a_catalog_built_anew_holds_them() -> None:
    # Updates to known items refresh the entries in place (no sort of the whole catalog); an added
    # item sorts again. Either way what readers see equals a view built from the items as they are.
    rng = random.Random(5)
    ids = [f"i{j}" for j in range(300)]
    catalog = CatalogView({i: ItemInfo(i, "", UNCATEGORISED, 1.0, float(j % 40), True, j % 9 == 0) for j, i in enumerate(ids)})
    for step in range(60):
        updates = [
            ItemUpdate(item_id=rng.choice(ids), in_stock=rng.random() < 0.7, promoted=rng.random() < 0.2, price=step + 1.0)
            for _ in range(rng.randint(1, 5))
        ]
        if step % 15 == 14:
            ids.append(f"new-{step}")
            updates.append(ItemUpdate(item_id=ids[-1], promoted=True))
        catalog.apply(updates)
        anew = CatalogView({i: info for i in ids if (info := catalog.get(i)) is not None})
        assert catalog.promoted == anew.promoted
        for since in (0.0, 20.0, 39.0):
            assert catalog.newest(since, 50) == anew.newest(since, 50)
    assert any(info.item_id.startswith("new-") for info in catalog.newest(0.0, 10))
