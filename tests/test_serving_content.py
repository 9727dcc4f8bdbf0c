"""Items new since the model's cutoff: a `PUT /v1/catalog/items` gives them a content vector at once, in
every serving worker and in the speed layer, so ALS scoring and similar items reach them (real Redis, real app)."""

from __future__ import annotations

import time

import numpy as np
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from common import redis_keys
from common.catalog import ItemUpdate
from common.settings import ModelsSettings
from serving.main import create_app
from speed_layer.consumer import SpeedConsumer
from tests.test_serving_support import make_settings, recs, serving_state

pytest_plugins = ["tests.test_serving_support"]

FRESH = {"item_id": "fresh-1", "title": "Item new", "category_path": ["Root", "cat3"], "price": 20.0}


def similar(client: TestClient, item: str, k: int = 10) -> list[dict[str, object]]:
    response = client.get(f"/v1/items/{item}/similar", params={"k": k})
    assert response.status_code == 200, response.text
    items: list[dict[str, object]] = response.json()["items"]
    return items


def test_a_new_item_is_scored_by_als_and_found_similar_by_its_content(
    client: TestClient, published: SyntheticModel
) -> None:
    assert client.get("/v1/items/fresh-1/similar").status_code == 404  # no batch vector, no content yet
    assert client.put("/v1/catalog/items", json=[FRESH]).status_code == 200

    found = similar(client, "fresh-1")
    assert {i["source"] for i in found} == {"content"} and found[0]["reason"] == "similar title and category"
    assert sum(i["category"] == "cat3" for i in found) >= 8  # 3 % 8: its category's items
    of_a_neighbour = similar(client, "i3", k=20)
    assert "fresh-1" in [i["item_id"] for i in of_a_neighbour]
    assert next(i for i in of_a_neighbour if i["item_id"] == "fresh-1")["source"] == "content"
    assert {"covis", "als"} <= {i["source"] for i in of_a_neighbour}  # i3's co-visits and batch neighbours

    # u3 leans to cat3: the ALS list (scored with the user's batch vector) now proposes the new item.
    body = recs(client, user_id="u3", k=100)
    fresh = [i for i in body["items"] if i["item_id"] == "fresh-1"]
    assert fresh and "als" in fresh[0]["sources"], body["items"]


def test_another_worker_and_the_speed_layer_get_the_same_content_vector(
    client: TestClient, published: SyntheticModel, redis_client: redis.Redis
) -> None:
    consumer = SpeedConsumer(redis_client, make_settings(), name="content-test")
    try:
        assert consumer._model(published.version) is not None
        with TestClient(create_app(make_settings())) as other:
            deadline = time.monotonic() + 30
            while redis_client.pubsub_numsub(redis_keys.CATALOG_CHANNEL)[0][1] < 3:  # both apps and the consumer
                assert time.monotonic() < deadline, "the workers never subscribed to the catalog channel"
                time.sleep(0.05)
            assert client.put("/v1/catalog/items", json=[FRESH]).status_code == 200
            deadline = time.monotonic() + 30
            while other.get("/v1/items/fresh-1/similar").status_code != 200:  # over the catalog channel
                assert time.monotonic() < deadline, "the other worker never heard of the new item"
                time.sleep(0.05)
            while consumer.models[published.version].item_vector("fresh-1") is None:
                assert time.monotonic() < deadline, "the speed layer never heard of the new item"
                consumer._housekeeping()  # reads the catalog channel as its loop does
            served = serving_state(client).models.current
            heard = serving_state(other).models.current
            assert served is not None and heard is not None
            vector = served.artifacts.item_vector("fresh-1")
            assert vector is not None
            np.testing.assert_array_equal(heard.artifacts.item_vector("fresh-1"), vector)
            np.testing.assert_array_equal(consumer.models[published.version].item_vector("fresh-1"), vector)

            # A burst of updates (one message an item) reaches the other worker whole.
            burst = [{"item_id": f"i{j}", "price": 100.0 + j, "in_stock": j % 2 == 0} for j in range(20)]
            assert client.put("/v1/catalog/items", json=burst).status_code == 200
            other_catalog = serving_state(other).catalog

            def heard_burst() -> bool:
                infos = [other_catalog.get(f"i{j}") for j in range(20)]
                return all(i is not None and (i.price, i.in_stock) == (100.0 + j, j % 2 == 0) for j, i in enumerate(infos))

            deadline = time.monotonic() + 30
            while not heard_burst():
                assert time.monotonic() < deadline, "the other worker missed updates of the burst"
                time.sleep(0.05)
            # New items of one update reach the speed layer together, each with its content vector.
            more = [{**FRESH, "item_id": f"fresh-{j}", "title": f"Item new {j}"} for j in (2, 3, 4)]
            assert client.put("/v1/catalog/items", json=more).status_code == 200
            held, deadline = consumer.models[published.version], time.monotonic() + 30
            while any(held.item_vector(f"fresh-{j}") is None for j in (2, 3, 4)):
                assert time.monotonic() < deadline, "the speed layer missed new items of the burst"
                consumer._housekeeping()
                held = consumer.models[published.version]

            # A change of content moves the vector everywhere; a change of stock does not.
            client.put("/v1/catalog/items", json=[{"item_id": "fresh-1", "category_path": ["Root", "cat5"]}])
            consumer.apply_catalog([ItemUpdate(item_id="fresh-1", category_path=["Root", "cat5"])])
            moved = consumer.models[published.version].item_vector("fresh-1")
            assert moved is not None and not np.allclose(moved, vector)
            current = serving_state(client).models.current
            assert current is not None
            np.testing.assert_array_equal(current.artifacts.item_vector("fresh-1"), moved)
    finally:
        consumer.pubsub.close()


def test_without_content_vectors_a_new_item_waits_for_the_retrain(published: SyntheticModel) -> None:
    settings = make_settings().model_copy(update={"models": ModelsSettings(content_vectors=False)})
    settings = settings.model_copy(update={"models": settings.models.model_copy(update={"root": make_settings().models.root})})
    with TestClient(create_app(settings)) as client:
        assert client.put("/v1/catalog/items", json=[FRESH]).status_code == 200
        assert client.get("/v1/items/fresh-1/similar").status_code == 404
        assert "fresh-1" not in [i["item_id"] for i in similar(client, "i3", k=30)]
