"""Trending's re-sum (speed_layer/trending.py): what a ZUNIONSTORE of the buckets would keep, reading a
bucket again only once its count of events moved."""

from __future__ import annotations

import numpy as np
import redis

from common import redis_keys
from speed_layer.trending import EPOCH, TrendingSum

TOP_N = 50


def _buckets(n: int) -> dict[str, float]:
    """n bucket keys, newest first, with decaying weights (common.speed_state.trending_decay_weights' shape)."""
    return {redis_keys.trending_bucket(1_800_000_000 - 300 * i): 0.5 ** (i / 12) for i in range(n)}


def _write(
    client: redis.Redis, rng: np.random.Generator, key: str, items: int, counted: bool = True, of: int = 400
) -> None:
    """Add events on `items` of `of` items to a bucket as the scripts do: the increments, and (counted) the
    bucket's count."""
    chosen = rng.choice(of, items, replace=False)
    # Few distinct weights: many members tie, in the bucket and in the sum.
    weights = rng.choice([1.0, 2.0, 3.0, 0.1, 1 / 3], items)
    for item, weight in zip(chosen.tolist(), weights.tolist(), strict=True):
        client.zincrby(key, weight, f"i{item}")
    if counted:
        client.zincrby(redis_keys.TRENDING_VERSIONS, items, key)


def _written(
    client: redis.Redis, rng: np.random.Generator, buckets: int, items: int, of: int = 400
) -> dict[str, float]:
    """`buckets` buckets (key -> weight, newest first), each with events on `items` of `of` items, counted."""
    window = _buckets(buckets)
    for key in window:
        _write(client, rng, key, items, of=of)
    return window


def _union(client: redis.Redis, buckets: dict[str, float]) -> list[tuple[bytes, float]]:
    """What the re-sum did before: ZUNIONSTORE of the weighted buckets, cut to the top n."""
    client.zunionstore("expected", buckets)
    client.zremrangebyrank("expected", 0, -(TOP_N + 1))
    return client.zrange("expected", 0, -1, withscores=True)


def _kept(client: redis.Redis) -> list[tuple[bytes, float]]:
    return client.zrange(redis_keys.TRENDING_TOP, 0, -1, withscores=True)


def test_the_re_sum_keeps_what_a_union_of_the_buckets_keeps_and_reads_only_the_buckets_counted_since(
    redis_client: redis.Redis,
) -> None:
    rng = np.random.default_rng(3)
    buckets = _written(redis_client, rng, 12, 40)
    trending = TrendingSum()

    assert trending.refresh(redis_client, buckets, TOP_N).read == 12  # a new consumer reads them all
    expected = _union(redis_client, buckets)
    assert _kept(redis_client) == expected  # to the last bit
    assert len(expected) == TOP_N

    newest, late = list(buckets)[0], list(buckets)[7]
    _write(redis_client, rng, newest, 30)
    _write(redis_client, rng, late, 5)  # a late event lands in an older bucket
    assert trending.refresh(redis_client, buckets, TOP_N).read == 2
    assert _kept(redis_client) == _union(redis_client, buckets)
    assert trending.refresh(redis_client, buckets, TOP_N).read == 0  # nothing counted since

    # A bucket written with no count (by an earlier speed layer) is read every time.
    uncounted = list(buckets)[3]
    redis_client.zrem(redis_keys.TRENDING_VERSIONS, uncounted)
    _write(redis_client, rng, uncounted, 20, counted=False)
    assert trending.refresh(redis_client, buckets, TOP_N).read == 1
    assert trending.refresh(redis_client, buckets, TOP_N).read == 1
    assert _kept(redis_client) == _union(redis_client, buckets)


def test_as_the_window_moves_the_buckets_it_left_are_forgotten_with_their_counts(
    redis_client: redis.Redis,
) -> None:
    rng = np.random.default_rng(4)
    window = _written(redis_client, rng, 30, 60, of=3000)
    trending = TrendingSum()
    before = {key: 0.5 ** (i / 12) for i, key in enumerate(list(window)[10:])}  # window is newest first
    trending.refresh(redis_client, before, TOP_N)

    # Ten buckets on: the ten newest join, the ten oldest leave; every weight changes with the window.
    moved = dict(list(window.items())[:20])
    assert trending.refresh(redis_client, moved, TOP_N).read == 10
    assert _kept(redis_client) == _union(redis_client, moved)
    assert set(trending.buckets) == set(moved)
    counted = {key.decode() for key in redis_client.zrange(redis_keys.TRENDING_VERSIONS, 0, -1)}
    assert counted == set(moved) | {EPOCH}

    # Members no bucket holds any more are dropped from the copy once they are most of it.
    for key in window:
        redis_client.delete(key)
    fresh = {redis_keys.trending_bucket(1_900_000_000): 1.0}
    redis_client.zadd(list(fresh)[0], {f"new{j}": float(j % 7) for j in range(80)})
    assert len(trending.members) > 1000
    assert trending.refresh(redis_client, fresh, TOP_N).read == 1
    assert len(trending.members) == 80
    assert _kept(redis_client) == _union(redis_client, fresh)


def test_an_empty_window_leaves_no_list(redis_client: redis.Redis) -> None:
    redis_client.zadd(redis_keys.TRENDING_TOP, {"stale": 1.0})
    assert TrendingSum().refresh(redis_client, _buckets(3), TOP_N).read == 3
    assert not redis_client.exists(redis_keys.TRENDING_TOP)  # as ZUNIONSTORE of empty sets leaves it


def test_a_redis_that_lost_its_data_is_read_anew_though_its_counts_reach_the_copy_s_again(
    redis_client: redis.Redis,
) -> None:
    rng = np.random.default_rng(5)
    buckets = _written(redis_client, rng, 12, 40)
    trending = TrendingSum()
    trending.refresh(redis_client, buckets, TOP_N)

    redis_client.flushall()  # a restart without persistence: buckets and counts gone
    for key in buckets:
        _write(redis_client, rng, key, 40)  # other events, the same counts as the copy was kept under
    assert trending.refresh(redis_client, buckets, TOP_N).read == 12
    assert _kept(redis_client) == _union(redis_client, buckets)
