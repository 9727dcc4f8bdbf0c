"""Speed-layer effects on a real redis-server: exactly once, dead letters, sessions, identify, SGD, catalog."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import redis

from common import redis_keys
from common.catalog import ItemUpdate
from common.catalog_state import apply_item_updates, seed_missing_items
from common.events import Consent, EventType
from common.messages import CHANGES_HEAD, CHANGES_TAIL, RecsChanged, RecsChangedBatch, change_json
from common.model import load_model, save_history
from common.neighbours import session_token
from common.redis_server import RedisServer, is_cluster
from common.registry import Registry
from common.sequence import FOLLOW_UNIT
from common.speed_state import ItemFlagsCopy, TrendingCopy, read_speed_state
from speed_layer.consumer import TRENDING_BUSY_SHARE, SpeedConsumer, trending_pause_s
from speed_layer.trending import EPOCH, Refreshed, TrendingSum
from tests.speed_factories import (
    add_events,
    make_event,
    publish_model,
    set_categories,
    speed_settings,
    within_one_day,
)

HOUR = timedelta(hours=1)


def drain(consumer: SpeedConsumer) -> None:
    while consumer.poll_once(block=False):
        pass


def test_duplicate_delivery_applies_once(any_redis: tuple[redis.Redis, str], tmp_path: Path) -> None:
    redis_client, url = any_redis
    settings = speed_settings(tmp_path, url)
    registry = Registry(settings.models.root)
    rng = np.random.default_rng(1)
    publish_model(
        registry, "v1", datetime.now(UTC) - HOUR, rng.normal(size=(20, 8)).astype(np.float32), ["u1"]
    )
    set_categories(redis_client, {"i1": "shoes", "i2": "hats"})
    consumer = SpeedConsumer(redis_client, settings, registry, name="c1")
    # One time for every event and re-sum: a trending bucket's end passing mid-test would weigh them apart.
    at = datetime.now(UTC)
    events = [
        make_event(EventType.VIEW, "i1", user_id="u1", ts=at, received_at=at),
        make_event(EventType.ADD_TO_CART, "i2", user_id="u1", quantity=2, ts=at, received_at=at),
        make_event(EventType.PURCHASE, "i2", user_id="u1", ts=at, received_at=at),
    ]
    add_events(redis_client, settings, events)
    add_events(redis_client, settings, events)  # the producer retried: every event arrives twice
    drain(consumer)
    entries = redis_client.xrange(redis_keys.stream())
    consumer.process(entries)  # and a redelivery of everything after the ack

    state = read_speed_state(
        redis_client, "u1", session_id="s1", model_version="v1", candidate_items=["i1", "i2"]
    )
    assert state.session_counts == {"view": 1, "add_to_cart": 1, "purchase": 1}
    assert state.person_items == {"i1": 1.0, "i2": 8.0}  # view 1; cart 3 + purchase 5
    assert state.cart == {}  # bought
    assert set(state.purchases) == {"i2"}
    assert state.delta_events == 3
    assert state.day_counts[:, -1].tolist() == [1.0, 2.0]
    assert state.covisitation == {"i1": {"i2": 1.0}, "i2": {}}  # ordered: i2 followed i1, once
    assert redis_client.xpending(redis_keys.stream(), settings.speed.group)["pending"] == 0
    redis_client.delete(redis_keys.TRENDING_REFRESH_LOCK)  # taken by the drain's first poll
    assert consumer.refresh_trending(now_s=at.timestamp())
    trending = dict(read_speed_state(redis_client, "u1", session_id="s1").trending)
    assert trending == {"i1": 1.0, "i2": 8.0}
    # Each bucket's events are counted, once each (speed_layer/trending.py reads a bucket whose count moved).
    counts = redis_client.zrange(redis_keys.TRENDING_VERSIONS, 0, -1, withscores=True)
    assert sum(count for bucket, count in counts if bucket != EPOCH.encode()) == len(events)
    add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", user_id="u1", ts=at, received_at=at)])
    drain(consumer)
    redis_client.delete(redis_keys.TRENDING_REFRESH_LOCK)
    assert consumer.refresh_trending(now_s=at.timestamp())  # the consumer's copy follows the count
    assert dict(read_speed_state(redis_client, "u1", session_id="s1").trending) == {"i1": 2.0, "i2": 8.0}


def test_a_copy_of_trending_is_sent_again_only_once_a_re_sum_wrote_the_list(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    client, url = any_redis
    settings = speed_settings(tmp_path, url)
    consumer = SpeedConsumer(client, settings, Registry(settings.models.root), name="c1")
    at = datetime.now(UTC)  # one bucket for every event and re-sum, as above

    def viewed(item: str, times: int) -> None:
        add_events(client, settings, [make_event(EventType.VIEW, item, ts=at, received_at=at) for _ in range(times)])
        drain(consumer)
        client.delete(redis_keys.TRENDING_REFRESH_LOCK)  # taken by the drain's poll
        assert consumer.refresh_trending(now_s=at.timestamp())

    def top(n: int, copy: TrendingCopy | None) -> list[tuple[str, float]]:
        return read_speed_state(client, "anyone", trending_n=n, trending=copy).trending

    viewed("i1", 1)
    viewed("i2", 3)
    copy = TrendingCopy()
    assert top(2, copy) == [("i2", 3.0), ("i1", 1.0)]
    assert copy.top.token == client.get(redis_keys.TRENDING_TOP_TOKEN).decode()
    # A write past the re-sum leaves the token: a holder of the copy is not sent the list again.
    client.zadd(redis_keys.TRENDING_TOP, {"i9": 50.0})
    assert top(2, copy) == [("i2", 3.0), ("i1", 1.0)]
    assert top(2, None) == [("i9", 50.0), ("i2", 3.0)]
    # Fewer than the copy holds come from it; more are read again (and kept).
    assert top(1, copy) == [("i2", 3.0)]
    assert top(3, copy) == [("i9", 50.0), ("i2", 3.0), ("i1", 1.0)]
    assert top(2, copy) == [("i9", 50.0), ("i2", 3.0)]
    # A re-sum writes a new token with the list: the next read gets the list it wrote.
    viewed("i1", 3)
    assert top(2, copy) == [("i1", 4.0), ("i2", 3.0)]
    # Without a token (a list an earlier version wrote) every read gets the list.
    client.delete(redis_keys.TRENDING_TOP_TOKEN)
    client.zadd(redis_keys.TRENDING_TOP, {"i7": 99.0})
    assert top(1, copy) == [("i7", 99.0)]
    client.zadd(redis_keys.TRENDING_TOP, {"i8": 100.0})
    assert top(1, copy) == [("i8", 100.0)]
    assert top(0, copy) == []


def test_a_trending_re_sum_holds_the_next_one_off_for_the_time_it_took_over_the_busy_share(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert trending_pause_s(0.001, 5.0) == 5.0  # cheap: the setting's period
    assert trending_pause_s(0.09, 5.0) == pytest.approx(0.09 / TRENDING_BUSY_SHARE)  # 90 ms: 18 s
    settings = speed_settings(tmp_path, redis_server.url, trending_refresh_s=0.001)
    first, other = SpeedConsumer(redis_client, settings, name="c1"), SpeedConsumer(redis_client, settings, name="c2")
    refreshes: list[Refreshed] = []
    refresh, slower_s = TrendingSum.refresh, 0.2

    def with_slower_first_reads(*args: Any) -> Refreshed:
        """The real re-sum, its first reads (those set apart from its pause) made `slower_s` longer."""
        refreshed = refresh(*args)
        if refreshed.first_reads_s:
            time.sleep(slower_s)
            refreshed = Refreshed(refreshed.read, refreshed.first_reads_s + slower_s)
        refreshes.append(refreshed)
        return refreshed

    monkeypatch.setattr(TrendingSum, "refresh", with_slower_first_reads)
    now, rng = int(time.time()), np.random.default_rng(0)
    # The window's buckets, 1,000 items each, written with no count (as by an earlier speed layer): each
    # re-sum reads them all again, ~10 ms or more.
    for age in range(72):
        items = rng.choice(50_000, 1_000, replace=False)
        redis_client.zadd(redis_keys.trending_bucket(now - now % 300 - 300 * age), {f"i{j}": 1 for j in items})
    assert first.refresh_trending()
    assert redis_client.zcard(redis_keys.TRENDING_TOP) == settings.speed.trending_top_n
    first_pause_s = first._trending_pause_s
    assert first_pause_s < slower_s / TRENDING_BUSY_SHARE / 2  # counted, the slower reads alone would give 40 s
    time.sleep(first_pause_s)
    assert first.refresh_trending()
    pause_ms = first._trending_pause_s * 1000
    # The first re-sum's reads of buckets new to the consumer are set apart (not counted in its pause);
    # the next reads them all again (no counts), and those reads count.
    assert [(r.read, r.first_reads_s > 0) for r in refreshes] == [(72, True), (72, False)]
    assert pause_ms >= 1_000  # 200 times the re-sum, far over the setting's 1 ms
    # The lock holds the others off for the pause (it was taken for 1 ms); the tolerance is for a slow CI.
    assert redis_client.pttl(redis_keys.TRENDING_REFRESH_LOCK) > 0.45 * pause_ms
    assert not other.refresh_trending()


def test_malformed_entry_goes_to_dead_letter_and_the_group_goes_on(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    stream = redis_keys.stream()
    redis_client.xadd(stream, {"e": b'{"event_type": "view"}'})
    redis_client.xadd(stream, {"other": b"x"})
    add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", anonymous_id="a1")])
    drain(consumer)

    dead = redis_client.xrange(redis_keys.dead_letter())
    assert len(dead) == 2
    assert b"event_id" in dead[0][1][b"reason"] and dead[0][1][b"raw"] == b'{"event_type": "view"}'
    assert b"no 'e' field" in dead[1][1][b"reason"]
    assert read_speed_state(redis_client, "a1", session_id="s1").session_counts == {"view": 1}
    assert redis_client.xpending(stream, settings.speed.group)["pending"] == 0


@pytest.mark.parametrize(
    ("recent_items", "covis_steps", "viewed", "one_batch"),
    [(20, 10, 25, True), (20, 10, 25, False), (20, 10, 15, True), (3, 10, 5, True), (3, 10, 5, False)],
)
def test_a_session_keeps_its_newest_recent_items_whether_or_not_the_covisit_read_saw_them_all(
    redis_client: redis.Redis,
    redis_server: RedisServer,
    tmp_path: Path,
    recent_items: int,
    covis_steps: int,
    viewed: int,
    one_batch: bool,
) -> None:
    # The script reads a new item's covis_steps + 1 newest; fewer is the whole set, cut only over recent_items.
    settings = speed_settings(tmp_path, redis_server.url, recent_items=recent_items, covis_steps=covis_steps)
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    start = datetime.now(UTC) - HOUR
    events = [make_event(EventType.VIEW, f"i{j}", ts=start + timedelta(seconds=j)) for j in range(viewed)]
    for batch in [events] if one_batch else [[e] for e in events]:
        add_events(redis_client, settings, batch)
        drain(consumer)
    recent = redis_client.zrange(redis_keys.session_recent("anon-1", "s1"), 0, -1)
    assert [item.decode() for item in recent] == [f"i{j}" for j in range(max(0, viewed - recent_items), viewed)]


def test_session_expires_and_identify_merges_the_device_into_the_user(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url, session_ttl_s=60)
    set_categories(redis_client, {"i1": "shoes", "i2": "hats"})
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_keys.RECS_CHANNEL)
    add_events(
        redis_client,
        settings,
        [
            make_event(EventType.VIEW, "i1", anonymous_id="dev"),
            make_event(EventType.ADD_TO_CART, "i2", anonymous_id="dev"),
            make_event(EventType.VIEW, "i9", anonymous_id="old", user_id="u7", session_id="s0"),
        ],
    )
    drain(consumer)
    recent_key = redis_keys.session_recent("dev", "s1")
    assert 0 < redis_client.ttl(recent_key) <= 60  # the session TTL, refreshed on activity
    messages = []
    deadline = time.monotonic() + 1  # all published by now; None also answers the (ignored) subscribe
    while time.monotonic() < deadline:
        if message := pubsub.get_message(timeout=0.1):
            messages.append(message["data"])
    # One message for the batch (its one script call), naming each person it changed once, in the order
    # they came, with the last event applied of them: the message RecsChangedBatch itself writes.
    assert messages == [
        RecsChangedBatch(
            changes=[
                RecsChanged(person_id="dev", session_id="s1", event_type="add_to_cart", item_id="i2"),
                RecsChanged(person_id="u7", session_id="s0", event_type="view", item_id="i9"),
            ]
        ).model_dump_json().encode()
    ]

    add_events(
        redis_client, settings, [make_event(EventType.IDENTIFY, None, anonymous_id="dev", user_id="u7")]
    )
    add_events(redis_client, settings, [make_event(EventType.VIEW, "i3", anonymous_id="dev")])  # no user_id
    drain(consumer)

    user = read_speed_state(redis_client, "dev", session_id="s1")  # the device resolves to its user
    assert user.person_id == "u7"
    assert set(user.session_items) == {"i1", "i2", "i3"}
    assert user.cart == {"i2": 1}
    assert set(user.category_affinity) == {"shoes", "hats"}
    assert user.person_items == {"i1": 1.0, "i2": 3.0, "i3": 1.0, "i9": 1.0}
    assert redis_client.exists(recent_key) == 0  # moved, not copied
    assert read_speed_state(redis_client, "u7").session_id in {"s0", "s1"}

    redis_client.pexpire(redis_keys.session_recent("u7", "s1"), 1)  # let the TTL run out
    time.sleep(0.01)
    assert read_speed_state(redis_client, "u7", session_id="s1").session_items == {}


def test_the_scripts_changes_are_written_as_recs_changed_batch_writes_them() -> None:
    changes = [("dev", "s1", "view", "i1"), ('pé"\\\n\u2028<', None, "purchase", None), ("u7", "_", "add_to_cart", "i/2")]
    written = [change_json(*change) for change in changes]
    models = [RecsChanged(person_id=p, session_id=s, event_type=t, item_id=i) for p, s, t, i in changes]
    assert [w.decode() for w in written] == [m.model_dump_json() for m in models]
    assert CHANGES_HEAD + ",".join(w.decode() for w in written) + CHANGES_TAIL == RecsChangedBatch(changes=models).model_dump_json()
    assert CHANGES_HEAD + CHANGES_TAIL == RecsChangedBatch(changes=[]).model_dump_json()


def _published(pubsub: redis.client.PubSub, expected: int = 0, quiet_s: float = 0.3) -> list[bytes]:
    """The messages heard: up to 30 s for the `expected` ones (a loaded machine), then `quiet_s` for others."""
    messages: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(messages) < expected and time.monotonic() < deadline:
        if message := pubsub.get_message(timeout=0.05):  # None also answers the (ignored) subscribe
            messages.append(message["data"])
    deadline = time.monotonic() + quiet_s
    while time.monotonic() < deadline:
        if message := pubsub.get_message(timeout=0.05):
            messages.append(message["data"])
    return messages


def test_the_script_announces_what_it_applies_before_its_reply_is_read_and_never_twice(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    redis_client, url = any_redis  # on a cluster: the person's split call, its PUBLISH heard on another node
    settings = speed_settings(tmp_path, url)
    registry = Registry(settings.models.root)
    publish_model(registry, "v1", datetime.now(UTC) - HOUR, np.random.default_rng(3).normal(size=(20, 8)).astype(np.float32), ["u1"])
    model = load_model(registry, "v1")
    applier = SpeedConsumer(redis_client, settings, registry, name="c1").applier
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_keys.RECS_CHANNEL)
    view = make_event(EventType.VIEW, "i1", user_id="u1")
    hover = make_event(EventType.HOVER, "i2", user_id="u1")
    anonymous = make_event(EventType.VIEW, "i3", anonymous_id="a9", consent=Consent.ANALYTICS)
    events = [view, hover, anonymous]

    cluster = is_cluster(redis_client)
    started = applier.start(events, [model])  # one Redis: written, the reply not read (as when the consumer dies)
    heard_before_the_reply = _published(pubsub, expected=0 if cluster else 1, quiet_s=0.5)
    assert applier.finish(started).applied == 3  # a cluster lane sends its calls when their replies are read
    # The view changed u1's list; the hover (after it) and an event without personalisation change none.
    announced = RecsChangedBatch(changes=[RecsChanged(person_id="u1", session_id="s1", event_type="view", item_id="i1")])
    if cluster:
        assert heard_before_the_reply == [] and _published(pubsub, expected=1) == [announced.model_dump_json().encode()]
    else:
        assert heard_before_the_reply == [announced.model_dump_json().encode()]
    assert applier.apply(events, [model]).duplicates == 3  # redelivered: announced already
    assert _published(pubsub) == []

    # A call that applies any of a person's events announces the last of them (no model: no delta that
    # the duplicate's would have moved, which sends the later event to a call of its own).
    later = make_event(EventType.ADD_TO_CART, "i4", user_id="u1")
    assert applier.apply([view, later], []).applied == 1
    assert _published(pubsub, expected=1) == [
        RecsChangedBatch(changes=[RecsChanged(person_id="u1", session_id="s1", event_type="add_to_cart", item_id="i4")])
        .model_dump_json()
        .encode()
    ]
    replayed = make_event(EventType.VIEW, "i5", user_id="u1")
    switched = applier.apply([replayed], [model], base=False)  # a version switch's replay writes the delta only
    assert switched.applied == 1
    assert _published(pubsub, quiet_s=0.5) == []


def test_a_retry_after_login_is_applied_once(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    set_categories(redis_client, {"i2": "hats"})
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    cart = make_event(EventType.ADD_TO_CART, "i2", anonymous_id="dev")
    login = make_event(EventType.IDENTIFY, None, anonymous_id="dev", user_id="u7")
    signed = cart.model_copy(update={"user_id": "u7"})  # a client that stamps the user on its retries
    for batch in ([cart], [login], [cart], [signed]):  # the cart's answer was lost: sent again after login
        add_events(redis_client, settings, batch)
        drain(consumer)

    state = read_speed_state(redis_client, "u7", session_id="s1", candidate_items=["i2"])
    assert state.cart == {"i2": 1}
    assert state.person_items == {"i2": 3.0}
    assert state.session_counts == {"add_to_cart": 1}
    assert state.day_counts.sum() == 1.0  # popularity


def test_a_retry_whose_ts_moved_a_day_is_applied_once(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    cart = make_event(EventType.ADD_TO_CART, "i2", anonymous_id="dev")
    add_events(redis_client, settings, [cart, cart.model_copy(update={"ts": cart.ts - timedelta(days=1)})])
    drain(consumer)

    state = read_speed_state(redis_client, "dev", session_id="s1", candidate_items=["i2"])
    assert state.cart == {"i2": 1}
    assert state.person_items == {"i2": 3.0}
    assert state.day_counts.sum() == 1.0


def test_dedup_markers_are_dropped_after_their_ttl(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url, dedup_ttl_s=3600)
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    old, new = (make_event(EventType.VIEW, item, anonymous_id="dev") for item in ("i1", "i2"))
    add_events(redis_client, settings, [old])
    drain(consumer)
    seen = redis_keys.seen_events("dev")
    redis_client.zadd(seen, {old.event_id: time.time() - 3601})  # as if written an hour and a second ago
    add_events(redis_client, settings, [new])
    drain(consumer)
    assert redis_client.zrange(seen, 0, -1) == [new.event_id.encode()]
    assert 0 < redis_client.ttl(seen) <= 3600


def test_sgd_moves_scores_toward_the_engaged_category(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    k, per_category, categories = 16, 20, 5
    centroids = rng.normal(size=(categories, k))
    item_factors = np.vstack([c + 0.3 * rng.normal(size=(per_category, k)) for c in centroids]).astype(
        np.float32
    )
    item_factors *= 0.3
    user = (rng.normal(size=(1, k)) * 0.3).astype(np.float32)
    settings = speed_settings(tmp_path, redis_server.url)
    registry = Registry(settings.models.root)
    publish_model(registry, "v1", datetime.now(UTC) - HOUR, item_factors, ["u1"], user)
    model = load_model(registry, "v1")

    def category_rank(vector: np.ndarray, category: int) -> int:
        means = (item_factors @ vector).reshape(categories, per_category).mean(axis=1)
        return int((means > means[category]).sum())

    target = int(np.argmin((item_factors @ user[0]).reshape(categories, per_category).mean(axis=1)))
    assert category_rank(user[0], target) == categories - 1  # starts last
    items = [f"i{target * per_category + j}" for j in range(per_category)]
    add_events(
        redis_client, settings, [make_event(EventType.VIEW, items[j % 10], user_id="u1") for j in range(30)]
    )
    drain(SpeedConsumer(redis_client, settings, registry, name="c1"))

    state = read_speed_state(redis_client, "u1", model_version="v1")
    assert state.delta is not None and state.delta_events == 30
    assert np.linalg.norm(state.delta) <= settings.speed.max_delta_norm + 1e-5
    merged = model.user_factors[0] + state.delta
    assert category_rank(merged, target) == 0
    unseen = item_factors[
        target * per_category + 10 :
    ]  # the category's items the user never touched rise too
    assert (unseen @ merged).mean() > (unseen @ user[0]).mean()


def test_a_consumer_holds_its_version_without_what_only_requests_read(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The person history (and the ranker and batch tables) stay out of a consumer's memory: its effects
    need the factors alone, and a store's every history would sit unused in each consumer."""
    settings = speed_settings(tmp_path, redis_server.url)
    registry = Registry(settings.models.root)
    cutoff = datetime.now(UTC) - HOUR
    publish_model(registry, "v1", cutoff, np.random.default_rng(5).normal(size=(20, 8)).astype(np.float32), ["u1"])
    earlier = pa.table({"person_id": ["u1"], "item_id": ["i3"], "sessions": [2], "last_s": [cutoff.timestamp() - 60]})
    save_history(registry, "v1", earlier, kept=5)
    assert load_model(registry, "v1").history_of("u1") == {"i3": (2.0, float(int(cutoff.timestamp() - 60)))}

    consumer = SpeedConsumer(redis_client, settings, registry, name="c1")
    add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", user_id="u1")])
    drain(consumer)

    held = consumer.models["v1"]
    assert held.history is None and held.ranker is None and held.covisitation is None
    assert held.item_ids == load_model(registry, "v1").item_ids
    state = read_speed_state(redis_client, "u1", model_version="v1")
    assert state.delta is not None and state.delta_events == 1  # the SGD step ran on the lighter version


def test_catalog_updates_take_effect_at_once(redis_client: redis.Redis) -> None:
    apply_item_updates(
        redis_client,
        [ItemUpdate(item_id="i1", in_stock=False, price=9.5), ItemUpdate(item_id="i2", promoted=True)],
    )
    state = read_speed_state(redis_client, "anyone")
    assert state.out_of_stock == {"i1"} and state.promoted == {"i2"}
    assert redis_client.hget(redis_keys.item_state("i1"), "price") == b"9.5"
    apply_item_updates(redis_client, [ItemUpdate(item_id="i1", in_stock=True)])
    assert read_speed_state(redis_client, "anyone").out_of_stock == frozenset()


def test_a_copy_of_the_item_flags_is_sent_again_only_once_a_catalog_update_changed_them(
    redis_client: redis.Redis,
) -> None:
    apply_item_updates(redis_client, [ItemUpdate(item_id="i1", in_stock=False), ItemUpdate(item_id="i2", promoted=True)])
    copy = ItemFlagsCopy()
    first = read_speed_state(redis_client, "anyone", flags=copy)
    assert first.out_of_stock == {"i1"} and first.promoted == {"i2"}
    assert copy.flags.token == redis_client.get(redis_keys.ITEM_FLAGS_TOKEN).decode()
    # A write past the catalog's writer leaves the token: a holder of the copy is not sent the sets again.
    redis_client.sadd(redis_keys.OUT_OF_STOCK, "i9")
    assert read_speed_state(redis_client, "anyone", flags=copy).out_of_stock == {"i1"}
    assert read_speed_state(redis_client, "anyone").out_of_stock == {"i1", "i9"}
    # An update through the writer changes the token: the next read gets both sets as they are.
    apply_item_updates(redis_client, [ItemUpdate(item_id="i1", in_stock=True)])
    after = read_speed_state(redis_client, "anyone", flags=copy)
    assert after.out_of_stock == {"i9"} and after.promoted == {"i2"}
    # A price alone changes no flag, nor the token.
    token = copy.flags.token
    apply_item_updates(redis_client, [ItemUpdate(item_id="i3", price=2.0)])
    read_speed_state(redis_client, "anyone", flags=copy)
    assert copy.flags.token == token
    # Without a token (sets an earlier version wrote) every read gets the sets, and no copy is kept.
    redis_client.delete(redis_keys.ITEM_FLAGS_TOKEN)
    redis_client.sadd(redis_keys.OUT_OF_STOCK, "i8")
    assert read_speed_state(redis_client, "anyone", flags=copy).out_of_stock == {"i8", "i9"}
    redis_client.srem(redis_keys.OUT_OF_STOCK, "i8")
    assert read_speed_state(redis_client, "anyone", flags=copy).out_of_stock == {"i9"}
    # The speed layer's start writes one for them, without replacing a token that exists.
    seed_missing_items(redis_client, [])
    token = redis_client.get(redis_keys.ITEM_FLAGS_TOKEN)
    assert token is not None
    seed_missing_items(redis_client, [])
    assert redis_client.get(redis_keys.ITEM_FLAGS_TOKEN) == token


def test_an_items_category_counts_from_its_first_catalog_record_and_follows_a_move(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    consumer = SpeedConsumer(redis_client, settings, name="c1")

    def view_and_affinity() -> dict[str, float]:
        add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", anonymous_id="a1")])
        drain(consumer)
        affinity = read_speed_state(redis_client, "a1", session_id="s1").category_affinity
        return {c: round(w, 6) for c, w in affinity.items()}

    assert view_and_affinity() == {}  # no catalog record yet: no category to credit
    set_categories(redis_client, {"i1": "shoes"})
    assert set(view_and_affinity()) == {"shoes"}  # the unknown item was not cached as category-less

    set_categories(redis_client, {"i1": "hats"})  # the consumer hears the move on the catalog channel
    deadline = time.monotonic() + 5
    while "i1" in consumer.applier.categories.known and time.monotonic() < deadline:
        consumer._announced_versions()
    assert set(view_and_affinity()) == {"shoes", "hats"}


def test_a_hover_is_counted_for_its_session_and_is_no_interaction(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    registry = Registry(settings.models.root)
    publish_model(registry, "v1", datetime.now(UTC) - HOUR, np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32), ["u1"])
    set_categories(redis_client, {"i1": "shoes", "i2": "hats"})
    consumer = SpeedConsumer(redis_client, settings, registry, name="c1")
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(redis_keys.RECS_CHANNEL)
    hover = make_event(EventType.HOVER, "i2", user_id="u1").model_copy(update={"dwell_ms": 30_000})
    add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", user_id="u1"), hover])
    add_events(redis_client, settings, [make_event(EventType.HOVER, "i1", anonymous_id="a9")])
    drain(consumer)

    state = read_speed_state(redis_client, "u1", session_id="s1", model_version="v1", candidate_items=["i1", "i2"])
    assert state.session_counts == {"view": 1, "hover": 1}
    assert set(state.session_items) == {"i1"}  # what the session saw is what it viewed
    assert state.person_items == {"i1": 1.0}
    assert state.delta_events == 1
    assert state.day_counts[:, -1].tolist() == [1.0, 0.0]
    assert state.covisitation == {"i1": {}}  # i2 never followed i1
    assert set(state.category_affinity) == {"shoes"}
    hovering = read_speed_state(redis_client, "a9", session_id="s1")
    assert hovering.session_counts == {"hover": 1} and hovering.session_items == {}
    heard = []
    deadline = time.monotonic() + 1  # all published by now; None also answers the (ignored) subscribe
    while time.monotonic() < deadline:
        if message := pubsub.get_message(timeout=0.1):
            heard.extend(change.person_id for change in RecsChangedBatch.model_validate_json(message["data"]).changes)
    assert heard == ["u1"]  # the view changed u1's list; a9's hover changes nothing


def test_trimmed_sets_stay_bounded_as_they_grow_over_many_script_calls(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # One session per device: "a", then a new item bought. Two events a script call, so item a's
    # co-visits, its neighbour sessions and the category's bestsellers each grow by one member a call.
    settings = speed_settings(
        tmp_path, redis_server.url, covis_top_n=2, covis_steps=1, neighbour_sessions_per_item=2,
        bestsellers_top_n=2, script_chunk=2,
    )  # fmt: skip
    followers = [f"x{k}" for k in range(5)]
    set_categories(redis_client, {"a": "C", **{x: "C" for x in followers}})
    consumer = SpeedConsumer(redis_client, settings, Registry(settings.models.root), name="c1")
    sizes: list[tuple[int, int, int]] = []
    for k, item in enumerate(followers):
        device, session = f"d{k}", f"s{k}"
        add_events(
            redis_client, settings,
            [make_event(EventType.VIEW, "a", device, session_id=session),
             make_event(EventType.PURCHASE, item, device, session_id=session)],
        )  # fmt: skip
        drain(consumer)
        sizes.append(
            (
                redis_client.hlen(redis_keys.covisitation("a")),
                redis_client.zcard(redis_keys.item_sessions("a")),
                redis_client.zcard(redis_keys.category_bestsellers("C")),
            )
        )
    # Kept whole up to twice the bound; the call that takes a set past it cuts it to the bound.
    assert sizes == [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4), (2, 2, 2)]
    assert set(redis_client.hkeys(redis_keys.covisitation("a"))) <= {x.encode() for x in followers}


def test_a_co_visit_row_past_twice_its_bound_keeps_its_heaviest_and_a_read_takes_the_heaviest(
    any_redis: tuple[redis.Redis, str], tmp_path: Path
) -> None:
    """On a Redis Cluster too, where apply_globals.lua writes the rows: the row's cut keeps the heaviest
    followers, whatever order they joined in, and a read of a row longer than covis_top_n takes its
    heaviest (equal weights by member descending, as a sorted set's ZREVRANGE did)."""
    client, url = any_redis
    settings = speed_settings(tmp_path, url, covis_top_n=2, covis_steps=1)
    row = redis_keys.covisitation("a")
    client.hset(row, mapping={"x1": 2 * FOLLOW_UNIT, "x2": 5 * FOLLOW_UNIT, "x3": 3 * FOLLOW_UNIT, "x4": 3 * FOLLOW_UNIT})
    state = read_speed_state(client, "reader", covis_items=["a"], covis_n=2)
    assert state.covisitation == {"a": {"x2": 5.0, "x4": 3.0}}  # x3 and x4 tie: the greater member
    consumer = SpeedConsumer(client, settings, Registry(settings.models.root), name="c1")
    add_events(client, settings, [make_event(EventType.VIEW, "a", "d1", session_id="s1"), make_event(EventType.VIEW, "y", "d1", session_id="s1")])
    drain(consumer)  # y joins: five followers, over twice the 2 kept
    assert {m.decode(): int(u) for m, u in client.hgetall(row).items()} == {"x2": 5 * FOLLOW_UNIT, "x4": 3 * FOLLOW_UNIT}
    add_events(client, settings, [make_event(EventType.VIEW, "a", "d2", session_id="s2"), make_event(EventType.VIEW, "x4", "d2", session_id="s2")])
    drain(consumer)  # an existing follower grows: no cut, and it adds up
    assert int(client.hget(row, "x4")) == 4 * FOLLOW_UNIT and client.hlen(row) == 2


def test_times_and_counts_reach_redis_exactly_as_the_events_give_them(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The script hands times to Redis as the text they came in and whole numbers as integers (not as
    Lua numbers it would format): every stored time is the event's `time_score`, to the microsecond,
    and the counts are whole."""
    redis_client.flushall()
    settings = speed_settings(tmp_path, redis_server.url)
    consumer = SpeedConsumer(redis_client, settings, Registry(settings.models.root), name="c1")
    start = within_one_day(HOUR, timedelta(seconds=5)).replace(microsecond=123_457)
    events = [
        make_event(EventType.VIEW, "i1", ts=start),
        make_event(EventType.VIEW, "i2", ts=start + timedelta(microseconds=987_651)),
        make_event(EventType.ADD_TO_CART, "i2", ts=start + timedelta(seconds=2, microseconds=7), quantity=3),
        make_event(EventType.PURCHASE, "i2", ts=start + timedelta(seconds=3, microseconds=333_333)),
    ]
    add_events(redis_client, settings, events)
    drain(consumer)

    def scores(key: str) -> dict[str, float]:
        return {m.decode(): s for m, s in redis_client.zrange(key, 0, -1, withscores=True)}

    ts = [redis_keys.time_score(e.ts) for e in events]
    assert scores(redis_keys.session_recent("anon-1", "s1")) == {"i1": ts[0], "i2": ts[3]}
    assert scores(redis_keys.person_sessions("anon-1")) == {"s1": ts[3]}
    assert scores(redis_keys.person_purchases("anon-1")) == {"i2": ts[3]}
    assert scores(redis_keys.item_sessions("i1")) == {session_token("anon-1", "s1"): ts[0]}
    assert scores(redis_keys.neighbour_session(session_token("anon-1", "s1"))) == {"i1": ts[0], "i2": ts[1]}
    assert redis_client.hgetall(redis_keys.session_counts("anon-1", "s1")) == {
        b"view": b"2", b"add_to_cart": b"1", b"purchase": b"1"
    }
    day = scores(redis_keys.popularity_day(int(events[0].ts.timestamp() // 86_400)))
    assert day == {"i1": 1.0, "i2": 3.0} and int(redis_client.hget(redis_keys.covisitation("i1"), "i2")) == FOLLOW_UNIT


def test_every_key_an_event_writes_expires_with_the_ttl_its_family_is_given(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each TTL setting a different value, so a key given another family's TTL (or none) fails; the
    counters by time expire at their bucket's or day's end, the items' rows (co-visits, bestsellers) never."""
    redis_client.flushall()
    ttl = {"session": 1_000, "history": 2_000, "dedup": 3_000, "neighbours": 4_000}
    settings = speed_settings(
        tmp_path, redis_server.url, session_ttl_s=ttl["session"], history_ttl_s=ttl["history"],
        dedup_ttl_s=ttl["dedup"], neighbour_session_ttl_s=ttl["neighbours"],
    )  # fmt: skip
    registry = Registry(settings.models.root)
    rng = np.random.default_rng(4)
    publish_model(registry, "v1", datetime.now(UTC) - HOUR, rng.normal(size=(20, 8)).astype(np.float32), ["u1"])
    set_categories(redis_client, {"i1": "shoes", "i2": "hats", "i4": "socks"})
    consumer = SpeedConsumer(redis_client, settings, registry, name="c1")
    add_events(
        redis_client, settings, [
            make_event(EventType.VIEW, "i4", user_id="u1"),
            make_event(EventType.VIEW, "i1", user_id="u1"),
            make_event(EventType.ADD_TO_CART, "i2", user_id="u1", quantity=2),
            make_event(EventType.PURCHASE, "i1", user_id="u1"),
            make_event(EventType.VIEW, "i3", user_id="u1"),
        ],
    )  # fmt: skip
    drain(consumer)

    expected = {
        "session_recent": ttl["session"], "session_categories": ttl["session"], "session_cart": ttl["session"],
        "session_counts": ttl["session"], "person_sessions": ttl["session"],
        "person_items": ttl["history"], "person_purchases": ttl["history"],
        "seen": ttl["dedup"], "deltas": ttl["dedup"], "delta_counts": ttl["dedup"],
        "neighbour_sessions": ttl["neighbours"], "item_sessions": ttl["neighbours"],
    }  # fmt: skip
    counters = {"trending_buckets", "popularity_days", "covisitation", "category_bestsellers"}
    found: dict[str, dict[str, int]] = {}
    for key in (k.decode() for k in redis_client.keys("*")):
        family = redis_keys.family_of(key)
        if family in expected or family in counters:
            found.setdefault(family, {})[key] = redis_client.ttl(key)
    assert sorted(found) == sorted(expected.keys() | counters)
    for family, seconds in expected.items():  # set in this drain: within a few seconds of the full TTL
        assert all(seconds - 5 <= left <= seconds for left in found[family].values()), (family, found[family])
    speed, now_s = settings.speed, time.time()
    for key, left in found["trending_buckets"].items():  # the bucket's end of the window, not a TTL from now
        ends_s = int(key.rsplit(":", 1)[1]) + speed.trending_window_s + speed.trending_bucket_s
        assert abs(left - (ends_s - now_s)) <= 5
    assert all(left > 0 for left in found["popularity_days"].values())
    assert all(left == -1 for left in [*found["covisitation"].values(), *found["category_bestsellers"].values()])
    # Carts and purchases make bestsellers; a view adds nothing, not even a member at 0.
    assert set(found["category_bestsellers"]) == {redis_keys.category_bestsellers(c) for c in ("shoes", "hats")}
