"""Per-day popularity counts: serving's worker cache reads today live and past days once."""

from __future__ import annotations

import numpy as np
import redis

from common import redis_keys
from common.features import DAY_S, POP_DAYS, day_index
from serving.core.day_counts import DayCounts

NOW_S = 1_780_000_000.0


def seed(client: redis.Redis, day_offset: int, item: str, count: float) -> None:
    client.zadd(redis_keys.popularity_day(day_index(NOW_S) + day_offset), {item: count})


def test_counts_are_laid_out_oldest_first_today_last(redis_client: redis.Redis) -> None:
    seed(redis_client, 0, "a", 5)
    seed(redis_client, -1, "a", 3)
    seed(redis_client, -(POP_DAYS - 1), "b", 2)
    seed(redis_client, -POP_DAYS, "b", 99)  # outside the window
    counts = DayCounts().read(redis_client, ["a", "b", "c"], NOW_S)
    assert counts.shape == (3, POP_DAYS)
    assert counts[0].tolist() == [0] * (POP_DAYS - 2) + [3, 5]
    assert counts[1].tolist() == [2] + [0] * (POP_DAYS - 1)
    assert counts[2].sum() == 0


def test_today_is_read_live_and_past_days_come_from_the_loaded_copy(redis_client: redis.Redis) -> None:
    cache = DayCounts(past_ttl_s=300)
    seed(redis_client, 0, "a", 1)
    seed(redis_client, -1, "a", 10)
    assert cache.refresh(redis_client, NOW_S) == POP_DAYS - 1
    seed(redis_client, 0, "a", 2)
    seed(redis_client, -1, "a", 20)  # a late event on a past day: the copy serves 10 until it is reloaded
    counts = cache.read(redis_client, ["a"], NOW_S)
    assert counts[0, -1] == 2
    assert counts[0, -2] == 10
    assert cache.refresh(redis_client, NOW_S) == 0  # still fresh
    reloaded = DayCounts(past_ttl_s=0)
    reloaded.refresh(redis_client, NOW_S)
    assert reloaded.read(redis_client, ["a"], NOW_S)[0, -2] == 20


def test_a_new_day_is_read_live_until_loaded_and_old_days_are_dropped(redis_client: redis.Redis) -> None:
    cache = DayCounts()
    seed(redis_client, 0, "a", 4)
    seed(redis_client, -(POP_DAYS - 1), "a", 7)
    cache.refresh(redis_client, NOW_S)
    seed(redis_client, 1, "a", 1)
    counts = cache.read(redis_client, ["a"], NOW_S + DAY_S)
    assert counts[0, -1] == 1
    assert counts[0, -2] == 4  # yesterday: not in the copy yet, read live
    assert counts[0].sum() == 5  # the day that left the window is gone
    assert cache.refresh(redis_client, NOW_S + DAY_S) == 1  # only the new past day loads
    seed(redis_client, 0, "a", 9)
    assert cache.read(redis_client, ["a"], NOW_S + DAY_S)[0, -2] == 4  # now from the copy


def test_the_loaded_copy_reads_what_redis_holds(redis_client: redis.Redis) -> None:
    rng = np.random.default_rng(3)
    items = [f"i{j}" for j in range(300)]
    for offset in range(-POP_DAYS, 1):
        for item in rng.choice(items, 120, replace=False):
            seed(redis_client, offset, str(item), float(rng.integers(1, 50)))
    asked = [*items[::3], "never-counted", items[0]]
    cache = DayCounts()
    cache.refresh(redis_client, NOW_S)
    assert np.array_equal(cache.read(redis_client, asked, NOW_S), DayCounts().read(redis_client, asked, NOW_S))


class Clock:
    """DayCounts' monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def zmscore_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_zmscore", {}).get("calls", 0))


def test_a_busy_worker_reads_today_from_its_copy_until_the_copy_ages_out(redis_client: redis.Redis) -> None:
    clock = Clock()
    cache = DayCounts(today_refresh_s=1.0, clock=clock)
    seed(redis_client, 0, "a", 1)
    seed(redis_client, 0, "b", 2)
    cache.refresh(redis_client, NOW_S)  # the past days' copy, as the worker loads it at start
    cache.read(redis_client, ["a", "b"], NOW_S)  # asks for as many counts as today holds
    assert cache.refresh_today(redis_client, NOW_S)
    seed(redis_client, 0, "a", 5)
    calls = zmscore_calls(redis_client)
    counts = cache.read(redis_client, ["a", "b", "c"], NOW_S)
    assert counts[:, -1].tolist() == [1, 2, 0]  # the copy's, a second behind at most
    assert zmscore_calls(redis_client) == calls  # no round trip for today
    clock.now += 1.9
    assert cache.read(redis_client, ["a"], NOW_S)[0, -1] == 1  # a refresh may run late: still the copy
    clock.now += 0.2
    assert cache.read(redis_client, ["a"], NOW_S)[0, -1] == 5  # older than two periods: live
    assert cache.read(redis_client, ["a"], NOW_S + DAY_S)[0, -2] == 5  # and never a copy of another day


def test_a_quiet_worker_reads_today_live(redis_client: redis.Redis) -> None:
    cache = DayCounts(today_refresh_s=1.0)
    for item in ("a", "b", "c"):
        seed(redis_client, 0, item, 1)
    cache.read(redis_client, ["a", "b"], NOW_S)  # fewer counts than today holds: a copy would cost more
    assert not cache.refresh_today(redis_client, NOW_S)
    seed(redis_client, 0, "a", 7)
    assert cache.read(redis_client, ["a"], NOW_S)[0, -1] == 7
    assert not DayCounts(today_refresh_s=0).refresh_today(redis_client, NOW_S)  # off: never a copy


def test_the_copy_of_today_holds_every_count_of_a_day_larger_than_a_scan_page(redis_client: redis.Redis) -> None:
    items = [f"i{j}" for j in range(12_000)]  # pages of the ZSCAN, past the listpack encoding
    redis_client.zadd(redis_keys.popularity_day(day_index(NOW_S)), {item: j % 97 + 1 for j, item in enumerate(items)})
    cache = DayCounts(today_refresh_s=1.0)
    asked = [*items, "never-counted"]
    live = cache.read(redis_client, asked, NOW_S)
    assert cache.refresh_today(redis_client, NOW_S)
    assert np.array_equal(cache.read(redis_client, asked, NOW_S), live)
