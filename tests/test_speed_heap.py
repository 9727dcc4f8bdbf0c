"""A warmed-up consumer applies a whole batch without a garbage collection walking it (common/heap.py)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import redis

from common.redis_server import RedisServer
from common.registry import Registry
from common.stream import group_lag
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import add_events, make_event, speed_settings


def test_a_warmed_up_consumer_applies_its_batches_without_a_collection(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    consumer = SpeedConsumer(redis_client, settings, Registry(settings.models.root), name="c1")
    thresholds = gc.get_threshold()  # process-wide: put back for the tests after this one
    collections: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    try:
        consumer.warm_up()
        # 40 visitors browsing 50 items: sessions, co-visits, trending and counts all written.
        events = [make_event(item_id=f"i{j % 50}", anonymous_id=f"anon-{j % 40}", session_id=f"s{j % 40}") for j in range(2000)]
        add_events(redis_client, settings, events)
        gc.callbacks.append(count)
        try:
            while consumer.poll_once(block=False):
                pass
        finally:
            gc.callbacks.remove(count)
    finally:
        gc.set_threshold(*thresholds)
    assert group_lag(redis_client, settings.redis.stream, settings.speed.group) == 0  # every event applied
    assert collections == []  # at CPython's default threshold, a collection every ~700 objects kept
