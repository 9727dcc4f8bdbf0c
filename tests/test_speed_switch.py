"""The lambda-merge switch: a new version's deltas hold exactly the events received at or after its cutoff."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis

from common import redis_keys
from common.events import Event, EventType, events_to_table
from common.lake import Lake
from common.redis_server import connect
from common.registry import Registry, publish_model_event
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import add_events, make_event, publish_model, speed_settings

USERS = ["u1", "u2", "u3"]


def marked(client: redis.Redis, person: str, event: Event, version: str) -> bool:
    return client.zscore(redis_keys.seen_events(person), redis_keys.seen_field(event.event_id, version)) is not None


def test_switch_replays_exactly_the_events_after_the_cutoff(any_redis: tuple[redis.Redis, str], tmp_path: Path) -> None:
    redis_client, url = any_redis
    now = datetime.now(UTC)
    settings = speed_settings(tmp_path, url)
    registry = Registry(settings.models.root)
    lake = Lake(settings.lake.root)
    factors = np.random.default_rng(2).normal(scale=0.3, size=(40, 8)).astype(np.float32)
    publish_model(registry, "v1", now - timedelta(hours=3), factors, USERS)
    cutoff_v2 = now - timedelta(hours=1)

    def view(user: str, j: int, received_at: datetime):  # noqa: ANN202 - a local factory
        return make_event(EventType.VIEW, f"i{j % 40}", user_id=user, received_at=received_at, ts=received_at)

    # Already trimmed from the stream, only in the lake: two hours old (before v2's cutoff) and 30 min old.
    lake_only = [view(u, j, now - timedelta(hours=2)) for j, u in enumerate(USERS * 2)]
    lake_only += [view(u, j, now - timedelta(minutes=30)) for j, u in enumerate(USERS * 3)]
    lake.write_events(events_to_table(lake_only))
    live = [view(u, j, datetime.now(UTC)) for j, u in enumerate(USERS * 4)]
    lake.write_events(events_to_table(live[:6]))  # the lake writer already landed some live ones too
    add_events(redis_client, settings, live)

    consumer = SpeedConsumer(redis_client, settings, registry, lake, name="c1")
    while consumer.poll_once(block=False):  # bootstraps v1 (replay from its cutoff), then live
        pass
    assert redis_client.get(redis_keys.SPEED_VERSION) == b"v1"

    # v2 is published while events keep arriving and a second consumer works the group.
    publish_model(registry, "v2", cutoff_v2, factors, USERS, activate=False)
    stop = threading.Event()
    during: list = []
    other = SpeedConsumer(connect(url, timeout_s=5), settings, registry, lake, name="c2")

    def produce_and_consume() -> None:
        for round_ in range(20):
            batch = [view(u, round_, datetime.now(UTC)) for u in USERS]
            add_events(redis_client, settings, batch)
            during.extend(batch)
            other.poll_once(block=False)
        while other.poll_once(block=False):
            pass
        stop.set()

    worker = threading.Thread(target=produce_and_consume)
    worker.start()
    publish_model_event(redis_client, registry.activate("v2"))
    consumer.poll_once(block=False)  # hears the message and rebuilds v2
    worker.join(timeout=60)
    assert stop.is_set()
    while consumer.poll_once(block=False):
        pass

    assert redis_client.get(redis_keys.SPEED_VERSION) == b"v2"
    assert redis_client.get(redis_keys.SPEED_PENDING_VERSION) is None
    everything = {e.event_id: e for e in lake_only + live + during}
    for user in USERS:
        mine = [e for e in everything.values() if e.user_id == user]
        in_v2 = [e for e in mine if e.received_at and e.received_at >= cutoff_v2]
        in_v1 = [e for e in mine if e.received_at and e.received_at >= now - timedelta(hours=3)]
        assert int(redis_client.get(redis_keys.user_event_count(user, "v2")) or 0) == len(in_v2)
        # v1 was rebuilt at start from the lake too, then got live events until v2 took over.
        assert int(redis_client.get(redis_keys.user_event_count(user, "v1")) or 0) <= len(in_v1)
        for event in in_v2:  # each event is in v2's delta, marked once
            assert marked(redis_client, user, event, "v2")
        for event in mine:
            if event not in in_v2:
                assert not marked(redis_client, user, event, "v2")
