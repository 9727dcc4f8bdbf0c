"""The bandit's impressions: the speed layer counts each served list of the experiment once.

Serving appends a served list in bandit mode to redis_keys.BANDIT_IMPRESSIONS; every consumer drains
that stream in its housekeeping, as one consumer group (redis_keys.BANDIT_GROUP). The rewards (a click
on a served list, a purchase after it in the session) are counted by the event script with the
event's own dedup marker (apply_events.lua, `apply_bandit`); on Redis Cluster by apply_globals.lua in
the bandit's group, under that group's marker of the event (effects.py).
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from common import redis_keys
from common.lua import load_script
from common.settings import Settings

log = logging.getLogger(__name__)

COUNT_IMPRESSIONS = load_script("speed_layer", "count_impressions.lua")
_ENTRY = COUNT_IMPRESSIONS.argv.packer("entry")
READ_COUNT = 1000  # entries per read


class ImpressionCounter:
    def __init__(self, client: redis.Redis, settings: Settings, name: str) -> None:
        self.client = client
        self.settings = settings
        self.name = name
        self.script = client.register_script(COUNT_IMPRESSIONS.source)
        try:
            client.xgroup_create(
                redis_keys.BANDIT_IMPRESSIONS, redis_keys.BANDIT_GROUP, id="0", mkstream=True
            )
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def count(self) -> int:
        """Count what other consumers left unacknowledged past speed.claim_idle_ms, then every new entry;
        returns how many served lists were counted now."""
        stream, group = redis_keys.BANDIT_IMPRESSIONS, redis_keys.BANDIT_GROUP
        claimed: Any = self.client.xautoclaim(
            stream, group, self.name, min_idle_time=self.settings.speed.claim_idle_ms, start_id="0-0",
            count=READ_COUNT,
        )  # fmt: skip
        counted = self._count([(i, f) for i, f in claimed[1] if f is not None])
        while True:
            reply: Any = self.client.xreadgroup(group, self.name, {stream: ">"}, count=READ_COUNT)
            entries = [(i, f) for i, f in reply[0][1]] if reply else []
            if not entries:
                return counted
            counted += self._count(entries)

    def _count(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        if not entries:
            return 0
        packed: list[object] = []
        for entry_id, fields in entries:
            counts, field = fields.get(b"counts"), fields.get(b"field")
            if counts is None or field is None:  # not a served list: acknowledged, not counted
                log.warning("dropping a malformed bandit impression %r", entry_id)
                counts = field = b""
            packed += _ENTRY(id=entry_id, counts=counts, field=field)
        experiments = self.settings.experiments
        args = COUNT_IMPRESSIONS.argv.pack(
            group=redis_keys.BANDIT_GROUP,
            ttl=experiments.posterior_ttl_s,
            entry_count=len(entries),
            entry=packed,
        )
        keys = [redis_keys.BANDIT_IMPRESSIONS]
        COUNT_IMPRESSIONS.check(keys, args)
        return int(self.script(keys=keys, args=args))
