"""Recommendations: the lambda merge reacts to speed state, rules hold, diversity holds, variants are stable."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import yaml
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from common import redis_keys
from serving.core.experiments import assign_variant
from serving.core.rules import Diversity, Rules
from serving.main import create_app
from tests.test_serving_support import ids, make_settings, recs, seed_session_view

# The fixtures (model_template, published, client) live in the support module.
pytest_plugins = ["tests.test_serving_support"]


def test_known_user_gets_k_items_with_reasons_and_metadata(
    client: TestClient, published: SyntheticModel
) -> None:
    body = recs(client, user_id="u3", k=10)
    assert len(body["items"]) == 10
    assert body["model_version"] == "v1"
    assert body["degraded"] is None
    assert body["variant"] in {"ranker", "als_only", "popular"}
    assert body["experiments"] == {"recs": body["variant"]}
    assert len(body["request_id"]) == 32
    assert all(item["reason"] for item in body["items"])
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_a_returning_persons_earlier_items_are_candidates_and_say_so(
    client: TestClient, published: SyntheticModel
) -> None:
    """u3's history in the version (bench.serve.synthetic_history): items 11, 19, 27, 35, 43 of cat3."""
    earlier = {f"i{j}" for j in (11, 19, 27, 35, 43)}
    body = recs(client, user_id="u3", k=20)
    from_history = {item["item_id"]: item for item in body["items"] if "history" in item["sources"]}
    assert from_history and set(from_history) <= earlier
    assert {item["reason"] for item in from_history.values()} == {"from your earlier visits"}
    guest = recs(client, anonymous_id="never-seen", k=20)
    assert not any("history" in item["sources"] for item in guest["items"])


def test_view_brings_covisited_items_and_raises_the_category(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    person, session = "anon-view-1", "s-view"
    before = recs(client, anonymous_id=person, session_id=session, k=10)
    viewed = "i13"  # category cat5 (13 % 8)
    covisited = {"i45": 50.0, "i77": 40.0}  # cat5 too; not among the batch co-visits of i13 (i21, i29, i37)
    assert not set(covisited) & set(ids(before))
    seed_session_view(redis_client, person, session, viewed, "cat5", covisited, weight=3.0)

    after = recs(client, anonymous_id=person, session_id=session, k=10)
    assert set(covisited) <= set(ids(after))
    reasons = {i["item_id"]: i["reason"] for i in after["items"]}
    assert reasons["i45"] == "because you viewed Item 13"
    share_before = sum(i["category"] == "cat5" for i in before["items"])
    share_after = sum(i["category"] == "cat5" for i in after["items"])
    assert share_after > share_before


def test_out_of_stock_and_recently_purchased_items_never_appear(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    first = ids(recs(client, user_id="u2", k=10))
    sold_out, bought = first[0], first[1]
    response = client.put("/v1/catalog/items", json=[{"item_id": sold_out, "in_stock": False}])
    assert response.status_code == 200 and response.json()["out_of_stock"] == [sold_out]
    redis_client.zadd(redis_keys.person_purchases("u2"), {bought: redis_keys.time_score(datetime.now(UTC) - timedelta(hours=1))})
    for _ in range(3):
        later = ids(recs(client, user_id="u2", k=20))
        assert sold_out not in later and bought not in later
    similar = client.get(f"/v1/items/{first[2]}/similar", params={"k": 50}).json()
    assert sold_out not in [i["item_id"] for i in similar["items"]]


def test_cart_items_are_excluded_and_drive_cart_context(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    person, session = "anon-cart", "s-cart"
    redis_client.zadd(redis_keys.person_sessions(person), {session: redis_keys.time_score(datetime.now(UTC))})
    redis_client.hset(redis_keys.session_cart(person, session), "i10", 1)
    body = recs(client, anonymous_id=person, session_id=session, context="cart", k=10)
    assert "i10" not in ids(body)
    assert {"i18", "i26"} & set(ids(body))  # batch co-visits of the cart item
    assert any(i["reason"] == "goes with Item 10 in your cart" for i in body["items"])


def test_product_context_excludes_the_product_and_explains_covisits(
    client: TestClient, published: SyntheticModel
) -> None:
    body = recs(client, anonymous_id="anon-pdp", context="product", item_id="i4", k=10)
    assert "i4" not in ids(body)
    assert "i12" in ids(body)
    assert any(i["reason"] == "often viewed with Item 4" for i in body["items"])


def test_diversity_cap_and_new_arrival_quota_hold(
    published: SyntheticModel, recs_env: Path, tmp_path: Path
) -> None:
    rules = Rules(diversity=Diversity(max_share_per_category=0.15))  # a store that caps categories
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules.model_dump()))
    with TestClient(create_app(make_settings(rules_file=rules_file))) as client:
        for person in ("u1", "u5", "anon-div"):
            key = "user_id" if person.startswith("u") else "anonymous_id"
            body = recs(client, **{key: person, "k": 20})
            per_category = Counter(i["category"] for i in body["items"])
            assert max(per_category.values()) <= rules.diversity.cap(20) == 3, per_category
            assert len(body["items"]) == 20
            assert set(published.new_items) & set(ids(body)), "one slot is reserved for new arrivals"


def test_promoted_items_are_boosted(client: TestClient, published: SyntheticModel) -> None:
    plain = recs(client, user_id="u6", k=20)
    last = plain["items"][-1]["item_id"]
    client.put("/v1/catalog/items", json=[{"item_id": last, "promoted": True}])
    boosted = recs(client, user_id="u6", k=20)
    before = {i["item_id"]: (n, i["score"]) for n, i in enumerate(plain["items"])}
    after = {i["item_id"]: (n, i["score"]) for n, i in enumerate(boosted["items"])}
    assert after[last][1] >= before[last][1] + Rules().boost.promoted - 1e-6  # the boost is added
    assert after[last][0] <= before[last][0]  # never down (up past every item it now outscores)
    assert next(i for i in boosted["items"] if i["item_id"] == last)["promoted"] is True


def test_variants_are_stable_per_person_and_close_to_shares(
    client: TestClient, published: SyntheticModel
) -> None:
    shares = {"ranker": 0.8, "als_only": 0.1, "popular": 0.1}
    people = [f"person-{n}" for n in range(20_000)]
    counts = Counter(assign_variant(p, shares) for p in people)
    for variant, share in shares.items():
        assert abs(counts[variant] / len(people) - share) < 0.01, counts
    assert [assign_variant(p, shares) for p in people[:500]] == [
        assign_variant(p, shares) for p in people[:500]
    ]
    seen = {recs(client, user_id="u9")["variant"] for _ in range(5)}
    assert seen == {assign_variant("u9", shares)}


def test_popular_variant_serves_trending(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    shares = {"ranker": 0.8, "als_only": 0.1, "popular": 0.1}
    person = next(f"p-{n}" for n in range(10_000) if assign_variant(f"p-{n}", shares) == "popular")
    redis_client.zadd(redis_keys.TRENDING_TOP, {"i150": 100.0, "i151": 90.0})
    body = recs(client, anonymous_id=person, k=5)
    assert body["variant"] == "popular"
    assert ids(body)[:2] == ["i150", "i151"]
    assert body["items"][0]["reason"] == "trending in cat6"


def test_new_person_is_folded_in_from_their_items(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    person = "anon-fold"
    redis_client.hset(redis_keys.person_items(person), mapping={"i3": 5.0, "i11": 5.0, "i19": 5.0})  # cat3
    body = recs(client, anonymous_id=person, k=10)
    assert any("als" in i["sources"] for i in body["items"])
    assert 3 <= Counter(i["category"] for i in body["items"])["cat3"] <= Rules().diversity.cap(10)
    stranger = recs(client, anonymous_id="anon-nothing", k=10)
    assert not any("als" in i["sources"] for i in stranger["items"])
