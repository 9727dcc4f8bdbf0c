"""Consent withdrawals recorded through the API (`POST /v1/users/{id}/consent`), and the consent an
event is applied with once they are taken into account.

An event carries the consent its page had when it was sent (events.Consent). Events sent before a
withdrawal may still wait in the stream, or be replayed from the lake at a version switch: a
withdrawal caps every event naming the id that was received before it, so the speed layer and the
lake writer treat them as sent with the state withdrawn to.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import redis

from common import redis_keys
from common.events import Consent, Event


@dataclass(frozen=True)
class Withdrawal:
    consent: Consent  # the state withdrawn to
    at_s: float  # when, on the API's clock (the one that stamps received_at)


def parse(raw: bytes | None) -> Withdrawal | None:
    """A stored withdrawal (redis_keys.consent_withdrawal), or None."""
    if not raw:
        return None
    state, at_s = raw.decode().split(" ")
    return Withdrawal(Consent(state), float(at_s))


def parse_many(ids: Sequence[str], replies: Sequence[bytes | None]) -> dict[str, Withdrawal]:
    """The withdrawals among an MGET of `consent_withdrawal(i) for i in ids`, by id."""
    return {i: w for i, raw in zip(ids, replies, strict=True) if (w := parse(raw)) is not None}


def read_withdrawals(client: redis.Redis, ids: Collection[str]) -> dict[str, Withdrawal]:
    ordered = sorted(set(ids))
    if not ordered:
        return {}
    replies = redis_keys.get_many(client, [redis_keys.consent_withdrawal(i) for i in ordered])
    return parse_many(ordered, replies)


def record_withdrawal(
    client: redis.Redis, ids: Collection[str], consent: Consent, at_s: float, ttl_s: int
) -> None:
    """Record a withdrawal to `consent` at `at_s` for each id, kept `ttl_s` (longer than an event can
    wait in the stream). An earlier withdrawal to a lower state keeps its state: the events before it
    were sent under what that one allowed."""
    known = read_withdrawals(client, ids)
    pipe = client.pipeline(transaction=False)
    for i in ids:
        earlier = known.get(i)
        state = consent if earlier is None else consent.capped(earlier.consent)
        pipe.set(redis_keys.consent_withdrawal(i), f"{state.value} {at_s!r}", ex=ttl_s)
    pipe.execute()


def applied_consent(event: Event, withdrawals: dict[str, Withdrawal]) -> Consent:
    """The event's consent, capped by the withdrawals of its ids recorded after it was received."""
    consent = event.consent
    if not withdrawals:  # the usual batch
        return consent
    assert event.received_at is not None  # consumers stamp it from the entry id when missing
    received_s = event.received_at.timestamp()
    for person in event.person_ids:
        withdrawal = withdrawals.get(person)
        if withdrawal is not None and received_s < withdrawal.at_s:
            consent = consent.capped(withdrawal.consent)
    return consent
