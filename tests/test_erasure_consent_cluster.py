"""Erasure and consent withdrawal on a real Redis Cluster (3 masters, 3 replicas) through the real API and
speed consumer, held to one redis-server: each scenario runs on both and must leave the same state.

The device is linked to the user by a real identify event (on the cluster, the stepwise merge)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis
from fastapi.testclient import TestClient

from common import redis_keys
from common.neighbours import session_token
from common.redis_server import LocalRedisCluster, RedisServer, is_cluster
from common.settings import get_settings
from serving.main import create_app
from speed_layer.consumer import SpeedConsumer
from tests.test_consent import popularity, shopping
from tests.test_erasure import drain, naming, post
from tests.test_serving_support import make_settings, serving_state, view_event

pytest_plugins = ["tests.test_serving_support"]

USER, DEVICE, OTHER = "u37", "dev-erase-37", "dev-keep"
# Written only by the cluster's split path (its markers and plans); the state they guard is compared.
SPLIT_BOOKKEEPING = {"group_seen", "global_plans"}


@contextmanager
def api_on(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app (auth off) on the published model and the Redis at `url`."""
    monkeypatch.setenv("RECS_REDIS__URL", url)
    get_settings.cache_clear()
    with TestClient(create_app(make_settings())) as api:
        yield api


def link(api: TestClient, consumer: SpeedConsumer, device: str, user: str) -> None:
    """The device signs in as the user: an identify event through the API, applied by the consumer."""
    post(api, {**view_event(device, "i5"), "event_type": "identify", "item_id": None, "user_id": user})
    drain(consumer)


def families(keys: frozenset[bytes]) -> Counter[str]:
    """How many keys of each family, less the split path's bookkeeping."""
    found = Counter(redis_keys.family_of(k.decode()) for k in keys)
    return Counter({f: n for f, n in found.items() if f not in SPLIT_BOOKKEEPING})


def aggregates(client: redis.Redis) -> dict[str, Any]:
    """The counters that outlive a person (they hold no id): popularity and the items' co-visits."""
    return {
        "popularity": {item: popularity(client, item) for item in ("i5", "i13", "i21", "i29")},
        "covisits": {
            item: sorted(client.hgetall(redis_keys.covisitation(item)).items())
            for item in ("i5", "i13", "i21")
        },
    }


def erase_scenario(api: TestClient, client: redis.Redis) -> dict[str, Any]:
    """A device browses, is linked to the user, the user shops from it; someone else browses; one more
    event of the user waits in the stream; then the user is erased and the device comes back."""
    settings = serving_state(api).settings
    consumer = SpeedConsumer(client, settings, name="c1")
    drain(consumer)  # switches the speed layer to the published version, so the user's events build a delta
    post(api, view_event(DEVICE, "i5"), {**view_event(DEVICE, "i13"), "event_type": "add_to_cart"})
    drain(consumer)
    link(api, consumer, DEVICE, USER)
    post(api, view_event(DEVICE, "i21", user_id=USER), view_event(DEVICE, "i13", user_id=USER),
         view_event(OTHER, "i5", session="s9"))  # fmt: skip
    drain(consumer)
    version = cast(bytes, client.get(redis_keys.SPEED_VERSION)).decode()
    held = redis_keys.holdings(client, USER)
    assert held.ids == (USER, DEVICE)
    assert redis_keys.user_delta(USER, version).encode() in held.keys
    # Global keys that name the person's sessions by token are theirs too (session-kNN).
    assert redis_keys.neighbour_session(session_token(USER, "s1")).encode() in held.keys
    others = redis_keys.holdings(client, OTHER).keys
    assert others and naming(client, [USER]) and naming(client, [DEVICE])
    post(api, view_event(DEVICE, "i29", user_id=USER, session="s3"))  # waits in the stream: deleted

    response = api.delete(f"/v1/users/{USER}")
    assert response.status_code == 200, response.text

    assert naming(client, [USER, DEVICE]) == []  # keys, members, values, stream entries, on every master
    assert redis_keys.holdings(client, USER).keys == frozenset()
    assert redis_keys.holdings(client, OTHER).keys == others
    assert not client.exists(redis_keys.neighbour_session(session_token(USER, "s1")))
    left = aggregates(client)
    # The device comes back, anonymous: its event is dropped (tombstone), nothing of it is recreated.
    post(api, view_event(DEVICE, "i29", session="s2"))
    drain(consumer)
    stream = redis_keys.stream(settings.redis.stream)
    assert [hit.split(": ")[0] for hit in naming(client, [USER, DEVICE])] == [stream]  # that entry alone
    assert aggregates(client) == left
    body = response.json()
    return {
        "response": {k: body[k] for k in ("devices_erased", "stream_entries_deleted")},
        "held": families(held.keys),
        "others": families(others),
        "aggregates": left,
    }


def withdraw_scenario(api: TestClient, client: redis.Redis) -> dict[str, Any]:
    """A linked user shops; more of their events wait in the stream; they withdraw personalisation (the
    in-flight events count in the aggregates only); a page that grants it again personalises again."""
    settings = serving_state(api).settings
    consumer = SpeedConsumer(client, settings, name="c1")
    drain(consumer)
    user, device = "u33", "dev-u33"
    post(api, view_event(device, "i5"))
    drain(consumer)
    link(api, consumer, device, user)
    post(api, *shopping(user, "personalisation"))
    drain(consumer)
    held = redis_keys.holdings(client, user)
    assert held.ids == (user, device) and held.keys
    post(api, *shopping(user, "personalisation", session="s2"))  # sent before, applied after
    before = popularity(client, "i13")

    response = api.post(f"/v1/users/{user}/consent", json={"consent": "analytics"})
    assert response.status_code == 200, response.text
    body = response.json()
    stream = redis_keys.stream(settings.redis.stream)
    assert {hit.split(": ")[0] for hit in naming(client, [user, device])} == {stream}

    drain(consumer)  # the events in flight count in the aggregates and build nothing of the person
    assert redis_keys.holdings(client, user).keys == frozenset()
    assert {hit.split(": ")[0] for hit in naming(client, [user, device])} == {stream}
    assert popularity(client, "i13") == before + 2
    capped = aggregates(client)

    post(api, *shopping(user, "personalisation", session="s3"))
    drain(consumer)
    assert client.exists(redis_keys.session_recent(user, "s3"))
    return {
        "response": {k: body[k] for k in ("devices", "consent", "lake_erasure_queued")},
        "held": families(held.keys),
        "aggregates": capped,
        "after_grant": families(redis_keys.holdings(client, user).keys),
    }


@pytest.mark.parametrize("scenario", [erase_scenario, withdraw_scenario], ids=["erasure", "withdrawal"])
def test_on_a_redis_cluster_as_on_one_redis(
    scenario: Any,
    published: object,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    redis_cluster: LocalRedisCluster,
    cluster_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scenario passes its checks on one redis-server and on the cluster, and leaves the same state:
    the same families of the person's keys before, the same response, the same aggregates after."""
    outcomes = []
    for url, client in ((redis_server.url, redis_client), (redis_cluster.url, cluster_client)):
        with api_on(url, monkeypatch) as api:
            assert is_cluster(serving_state(api).redis.client) == is_cluster(client)
            outcomes.append(scenario(api, client))
    single, cluster = outcomes
    assert cluster == single
