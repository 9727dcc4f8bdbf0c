"""Trending's re-sum: the window's buckets, decayed and summed into TRENDING_TOP, without holding Redis.

A ZUNIONSTORE of the window's 72 buckets held Redis for every client while it ran: ~55 ms with 2,000
items a bucket, ~87 ms with 5,000 (2026-12-06). Here the consumer keeps each bucket as it last read it
and reads again only the buckets written since: the scripts that count an event in a bucket count it in
TRENDING_VERSIONS too (bucket key -> events), in the same call, and a bucket is read after its count, so
a copy is never newer than the count it was kept under. A bucket with no count (written by an earlier
version of the speed layer, or past its scripts) is read every time. Each read is one ZRANGE of one
bucket: Redis is held for a bucket at a time, and usually reads only the newest.

The sum is ZUNIONSTORE's to the last bit: each item's weighted scores are added in the order Redis adds
them (tests/test_trending.py compares the two); and the list kept is the top `n` by (score, member
bytes), as ZREMRANGEBYRANK keeps it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis

from common import redis_keys
from common.speed_state import flat_scored, texts

# TRENDING_VERSIONS' member that marks its counts as one run of them: a random number written when
# there is none (a new store, or a Redis that lost its data).
EPOCH = "epoch"


@dataclass(frozen=True)
class Refreshed:
    read: int  # buckets read
    first_reads_s: float  # of the re-sum's time, the reads of a consumer's first (it reads every bucket)


@dataclass(frozen=True)
class _Bucket:
    version: float | None  # its count in TRENDING_VERSIONS before it was read (None: none: read every time)
    rows: np.ndarray  # positions of its members in TrendingSum's `members`
    scores: np.ndarray


class TrendingSum:
    """One consumer's copy of the window's buckets, and the re-sum over it."""

    def __init__(self) -> None:
        self.buckets: dict[str, _Bucket] = {}
        self.members: list[bytes] = []  # every member a kept bucket has held, by position
        self.position: dict[bytes, int] = {}
        self.epoch: float | None = None  # TRENDING_VERSIONS' EPOCH the copy was read under

    def refresh(self, client: redis.Redis, weights: Mapping[str, float], top_n: int) -> Refreshed:
        """Write TRENDING_TOP: the `top_n` highest of the buckets' sum, each bucket (key -> weight, newest
        first) weighted."""
        keys = list(weights)
        started = time.monotonic()
        epoch, *counts = client.zmscore(redis_keys.TRENDING_VERSIONS, [EPOCH, *keys])
        if epoch is None or epoch != self.epoch:
            # The counts began again (a Redis that lost its data): one could reach a count a copy was
            # kept under, with other events in it. Start over, as a new consumer.
            self.buckets.clear()
            self.epoch = epoch if epoch is not None else _new_epoch(client)
        first = not self.buckets
        changed = [
            (key, count)
            for key, count in zip(keys, counts, strict=True)
            if count is None or self._version(key) != count
        ]
        self._read(client, changed)
        reads_s = time.monotonic() - started
        self._forget_all_but(keys)
        self._write(client, *self._top(weights, top_n))
        self._forget_counts_before(client, min(map(redis_keys.trending_bucket_start, keys)))
        return Refreshed(len(changed), reads_s if first else 0.0)

    def _read(self, client: redis.Redis, changed: list[tuple[str, float | None]]) -> None:
        """Keep the buckets (key, count) as Redis holds them now."""
        # Buckets with no count in one round trip: mostly empty ones (a quiet hour, a new store).
        pipe = client.pipeline(transaction=False)
        for key, count in changed:
            if count is None:
                pipe.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
        uncounted = iter(pipe.execute())
        for key, count in changed:  # the counted ones a round trip each: Redis is held for one at a time
            reply = (
                next(uncounted)
                if count is None
                else client.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
            )
            self._keep(key, count, *_members_and_scores(reply))

    @staticmethod
    def _forget_counts_before(client: redis.Redis, oldest_s: int) -> None:
        """Remove the counts of the buckets that left the window (never of newer ones: another consumer's
        clock may be ahead, and a count must not start again from 0 under a copy kept at that count)."""
        counted = texts(cast(list[bytes], client.zrange(redis_keys.TRENDING_VERSIONS, 0, -1)))
        gone = [key for key in counted if key != EPOCH and redis_keys.trending_bucket_start(key) < oldest_s]
        if gone:
            client.zrem(redis_keys.TRENDING_VERSIONS, *gone)

    def _version(self, key: str) -> float | None:
        bucket = self.buckets.get(key)
        return None if bucket is None else bucket.version

    def _keep(self, key: str, version: float | None, members: list[bytes], scores: np.ndarray) -> None:
        self.buckets[key] = _Bucket(version, self._rows(members), scores)

    def _rows(self, members: Iterable[bytes]) -> np.ndarray:
        """The members' positions, new ones appended."""
        position, known = self.position, self.members
        rows = []
        for member in members:
            row = position.get(member)
            if row is None:
                row = position[member] = len(known)
                known.append(member)
            rows.append(row)
        return np.array(rows, dtype=np.int64)

    def _forget_all_but(self, keys: list[str]) -> None:
        """Drop the buckets that left the window; renumber the members once most are no bucket's."""
        for key in self.buckets.keys() - set(keys):
            del self.buckets[key]
        held = sum(len(bucket.rows) for bucket in self.buckets.values())
        if len(self.members) <= 2 * held + 1000:
            return
        old, self.members, self.position = self.members, [], {}
        for key, bucket in self.buckets.items():
            rows = self._rows(map(old.__getitem__, bucket.rows.tolist()))
            self.buckets[key] = _Bucket(bucket.version, rows, bucket.scores)

    def _top(self, weights: Mapping[str, float], top_n: int) -> tuple[list[bytes], np.ndarray]:
        """The members kept and their sums, by ZUNIONSTORE's arithmetic and ZREMRANGEBYRANK's order."""
        # Redis 7 multiplies each score by its weight, then adds them per member set by set, the sets
        # sorted by size (glibc's qsort, stable: ties in the keys' order). bincount adds in the order
        # given, from 0.0 (0.0 + x is x).
        held = sorted(
            ((self.buckets[key], weight) for key, weight in weights.items() if key in self.buckets),
            key=lambda pair: len(pair[0].rows),
        )
        if not held or top_n <= 0:
            return [], np.zeros(0)
        rows = np.concatenate([bucket.rows for bucket, _ in held])
        weighted = np.concatenate([bucket.scores * weight for bucket, weight in held])
        sums = np.bincount(rows, weights=weighted, minlength=len(self.members))
        present = np.flatnonzero(np.bincount(rows, minlength=len(self.members)))
        if len(present) > top_n:
            bound = np.partition(sums[present], len(present) - top_n)[len(present) - top_n]
            above = present[sums[present] > bound]
            tied = sorted(
                (self.members[row] for row in present[sums[present] == bound].tolist()), reverse=True
            )
            kept = [self.position[member] for member in tied[: top_n - len(above)]]
            present = np.concatenate([above, np.array(kept, dtype=np.int64)])
        return [self.members[row] for row in present.tolist()], sums[present]

    @staticmethod
    def _write(client: redis.Redis, members: list[bytes], sums: np.ndarray) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.delete(redis_keys.TRENDING_TOP)
        if members:
            pipe.zadd(redis_keys.TRENDING_TOP, dict(zip(members, sums.tolist(), strict=True)))
        pipe.set(redis_keys.TRENDING_TOP_TOKEN, secrets.token_hex(8))  # serving's copies read the list again
        pipe.execute()


def _new_epoch(client: redis.Redis) -> float:
    """Mark TRENDING_VERSIONS with an epoch, unless another consumer just did; the one it holds."""
    client.zadd(redis_keys.TRENDING_VERSIONS, {EPOCH: float(secrets.randbits(52))}, nx=True)
    return cast(float, client.zscore(redis_keys.TRENDING_VERSIONS, EPOCH))


def _members_and_scores(reply: Any) -> tuple[list[bytes], np.ndarray]:
    """A ZRANGE WITHSCORES sent as a raw command: redis-py 8 re-formats each RESP3 score as text to parse
    it again (~1.5 us a member, 20 ms for a bucket of 15,000); raw, hiredis has parsed the doubles."""
    flat = flat_scored(reply)
    return flat[0::2], np.array(flat[1::2], dtype=np.float64)  # numpy reads RESP2's texts too
