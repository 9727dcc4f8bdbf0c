"""Memory and key count of each key family (redis_keys.FAMILIES), measured in bounded time.

One SCAN pass over the keyspace sorts each key into its family; MEMORY USAGE is asked of at most
`samples` keys a family and the mean scaled to the family's count. A pass cut short by its time
budget has seen a fraction of the keyspace (SCAN's order spreads over it), and its counts are
scaled by DBSIZE to what it saw. On Redis Cluster each master is measured so (its share of the budget)
and the families summed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from common.redis_keys import FAMILIES, OTHER_FAMILY, family_of
from common.redis_server import is_cluster

SCAN_COUNT = 1000


@dataclass(frozen=True)
class FamilyUsage:
    keys: int  # counted, or estimated when the pass was cut short
    bytes: int  # mean MEMORY USAGE of the sampled keys times `keys`
    sampled: int


@dataclass(frozen=True)
class KeyspaceUsage:
    families: dict[str, FamilyUsage]  # every family of FAMILIES, then OTHER_FAMILY if any key is of none
    total_keys: int  # DBSIZE
    scanned: int  # keys the pass saw
    complete: bool  # the pass went round the whole keyspace

    def as_json(self) -> dict[str, Any]:
        return {
            "families": {
                name: {"keys": usage.keys, "bytes": usage.bytes} for name, usage in self.families.items()
            },
            "keys": self.total_keys,
            "scanned": self.scanned,
            "complete": self.complete,
        }


def keyspace_usage(client: redis.Redis, budget_s: float = 2.0, samples: int = 50) -> KeyspaceUsage:
    """Per family: key count and bytes, from one SCAN pass of at most `budget_s` (plus the samples)."""
    if not is_cluster(client):
        return _node_usage(client, budget_s, samples)
    masters = client.get_primaries()  # type: ignore[attr-defined]
    parts = [_node_usage(node.redis_connection, budget_s / len(masters), samples) for node in masters]
    names = list(dict.fromkeys(name for part in parts for name in part.families))
    families = {
        name: FamilyUsage(
            keys=sum(p.families[name].keys for p in parts if name in p.families),
            bytes=sum(p.families[name].bytes for p in parts if name in p.families),
            sampled=sum(p.families[name].sampled for p in parts if name in p.families),
        )
        for name in names
    }
    return KeyspaceUsage(
        families, sum(p.total_keys for p in parts), sum(p.scanned for p in parts), all(p.complete for p in parts)
    )


def _node_usage(client: redis.Redis, budget_s: float, samples: int) -> KeyspaceUsage:
    total = int(client.dbsize())
    counts: Counter[str] = Counter()
    sampled: dict[str, list[bytes | str]] = {}
    deadline = time.monotonic() + budget_s
    cursor, scanned = 0, 0
    while True:
        cursor, keys = client.scan(cursor, count=SCAN_COUNT)
        for key in keys:
            family = family_of(key)
            counts[family] += 1
            chosen = sampled.setdefault(family, [])
            if len(chosen) < samples:
                chosen.append(key)
        scanned += len(keys)
        if cursor == 0 or time.monotonic() >= deadline:
            break
    complete = cursor == 0
    scale = 1.0 if complete or not scanned else total / scanned
    names = [f.name for f in FAMILIES] + ([OTHER_FAMILY] if counts[OTHER_FAMILY] else [])
    families = {}
    for name in names:
        usages = _memory_usage(client, sampled.get(name, []))
        keys_est = round(counts[name] * scale)
        mean = sum(usages) / len(usages) if usages else 0.0
        families[name] = FamilyUsage(keys=keys_est, bytes=round(mean * keys_est), sampled=len(usages))
    return KeyspaceUsage(families, total, scanned, complete)


def _memory_usage(client: redis.Redis, keys: list[bytes | str]) -> list[int]:
    """MEMORY USAGE of each key still there (one round trip)."""
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key)
    return [int(n) for n in pipe.execute() if n is not None]  # None: expired since the scan
