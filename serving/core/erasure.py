"""GDPR erasure of a person's live state (their Redis keys and stream entries, and tombstones that keep
both from coming back), the same deletion of their keys on a withdrawal of personalisation consent, and
the erased people whose batch factors serving must ignore.

What Redis holds of the person and of the devices linked to them is listed by one function,
redis_keys.holdings; ids that no other id can reproduce in a key make that list exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis

from common import redis_keys
from common.consent import record_withdrawal
from common.events import Consent
from common.ids import id_digest
from common.settings import Settings
from common.stream import delete_entries_naming


@dataclass(frozen=True)
class Erased:
    ids: tuple[str, ...]  # the person, then the devices linked to them
    keys_deleted: int
    stream_entries_deleted: int


def erase_person(client: redis.Redis, settings: Settings, person_id: str) -> Erased:
    """Tombstone the person and their devices, delete the stream entries naming them, then every key
    holding them. The tombstones go first and the keys are listed last, so an event applied meanwhile
    is either dropped (it saw a tombstone) or its writes are among the keys deleted."""
    ids = redis_keys.person_and_devices(client, person_id)
    _tombstone(client, ids, settings.speed.erased_ttl_s)
    entries = delete_entries_naming(client, settings.redis.stream, ids)
    found, deleted = _delete_holdings(client, person_id)
    return Erased(found.ids, deleted, entries)


def withdraw_consent(
    client: redis.Redis, settings: Settings, person_id: str, consent: Consent, at_s: float
) -> Erased:
    """A withdrawal to `consent` (below personalisation): record it for the person and their devices
    (common/consent.py), then delete every key holding them as erasure does. The record goes first, so
    an event applied meanwhile is either capped (it saw the record) or its writes are among the keys
    deleted. No tombstone and no stream deletion: the person's later events still count, as their
    consent allows."""
    ids = redis_keys.person_and_devices(client, person_id)
    record_withdrawal(client, ids, consent, at_s, settings.speed.erased_ttl_s)
    found, deleted = _delete_holdings(client, person_id)
    return Erased(found.ids, deleted, 0)


def _delete_holdings(client: redis.Redis, person_id: str) -> tuple[redis_keys.Holdings, int]:
    """Delete every key holding the person and their devices, listed last (redis_keys.holdings)."""
    found = redis_keys.holdings(client, person_id)
    return found, int(client.delete(*found.keys)) if found.keys else 0


def _tombstone(client: redis.Redis, ids: tuple[str, ...], ttl_s: int) -> None:
    now = int(client.time()[0])
    pipe = client.pipeline(transaction=False)
    for person in ids:
        pipe.set(redis_keys.erased(person), now, ex=ttl_s)
    pipe.execute()


class ErasedPeople:
    """Erased people (by id digest) and when: a model version whose cutoff is not after a person's
    erasure was trained on their events, so serving treats them as unknown to it. Filled from the
    lake's erasure records (queued and applied), which outlive the queue, and at once by the route."""

    def __init__(self) -> None:
        self._at: dict[str, datetime] = {}

    def add(self, person_id: str, at: datetime) -> None:
        self.merge({id_digest(person_id): at})

    def merge(self, times: dict[str, datetime]) -> None:
        for digest, at in times.items():
            self._at[digest] = max(self._at.get(digest, at), at)

    def hides(self, person_id: str, cutoff: datetime) -> bool:
        """Whether the version with this cutoff holds the person's factors from before their erasure."""
        if not self._at:  # no digest to compute on the usual request
            return False
        at = self._at.get(id_digest(person_id))
        return at is not None and cutoff <= at
