"""Keyspace migrations the speed layer runs when a consumer starts: each converts, once, what an earlier
version wrote in a form this one no longer reads.

Each key is converted and deleted by one script call, so a crash, a retry or two consumers starting
together convert every key once. A migration is recorded in SPEED_MIGRATED once a whole pass finds
nothing left to convert (not after the pass that converted: a consumer of the earlier version still
running meanwhile may have written more), so later starts skip its SCAN of the whole keyspace.
"""

from __future__ import annotations

import logging

import redis

from common import redis_keys
from common.lua import load_script
from common.sequence import FOLLOW_UNIT

log = logging.getLogger(__name__)

CONVERT_COVISITS = load_script("speed_layer", "convert_covisits.lua")
COVISITS_IN_UNITS = "covisits-in-units"


def run_migrations(client: redis.Redis, covis_kept: int) -> None:
    """Run the migrations not recorded as done."""
    if client.sismember(redis_keys.SPEED_MIGRATED, COVISITS_IN_UNITS):
        return
    converted = convert_float_covisits(client, covis_kept)
    if converted:
        log.info("converted %d co-visit rows of an earlier version into units", converted)
    else:
        client.sadd(redis_keys.SPEED_MIGRATED, COVISITS_IN_UNITS)


def convert_float_covisits(client: redis.Redis, covis_kept: int) -> int:
    """Move every item's co-visits of float weights (`float_covisitation`) into its row of units; returns
    how many rows were converted."""
    convert = client.register_script(CONVERT_COVISITS.source)
    rows = 0
    for item in redis_keys.scan_grouped_ids(client, redis_keys.float_covisitation):
        keys = [redis_keys.float_covisitation(item), redis_keys.covisitation(item)]
        args = [FOLLOW_UNIT, covis_kept]
        CONVERT_COVISITS.check(keys, args)
        rows += int(convert(keys=keys, args=args)) > 0
    return rows
