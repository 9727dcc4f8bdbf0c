"""Apply a batch of events to Redis: plan each event's effects in Python, run them as pipelined Lua calls.

Python computes what needs the model (SGD deltas) and what needs lookups (categories, aliases,
the session's other items); the Lua script applies it with the dedup marker in one atomic step.
The same applier serves the live consumers (version-free effects plus the deltas of the current
and pending versions) and the version-switch replay (one version's deltas only).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import cast

import numpy as np
import redis
from redis.exceptions import NoScriptError

from common import consent, redis_keys
from common.events import ATTENTION_EVENTS, BESTSELLER_EVENTS, Consent, Event, EventType
from common.features import DAY_S, POP_DAYS, day_index, implicit_weight
from common.model import ModelArtifacts
from common.neighbours import session_token
from common.settings import Settings
from common.speed_state import forward_decay
from common.vectors import sgd_steps
from speed_layer.scripts import APPLY_EVENTS, MERGE_IDENTITY
from speed_layer.sender import Lane

log = logging.getLogger(__name__)

# Builders of the scripts' blocks by their declared names (speed_layer/*.lua headers).
_EVENT_KEYS = APPLY_EVENTS.keys.packer("event")
_EVENT_ARGS = APPLY_EVENTS.argv.packer("event")
_VERSION_KEYS = APPLY_EVENTS.keys.packer("per_version")
_VERSION_ARGS = APPLY_EVENTS.argv.packer("per_version")
_MERGE_SESSION_KEYS = MERGE_IDENTITY.keys.packer("session")

NO_SESSION = "_"  # session id of events sent without one
# The person keys of an event applied without personalisation consent: the script touches only the
# first (its dedup marker), so no key of the person is named.
_UNLINKED_PERSON_KEYS = [redis_keys.SEEN_UNLINKED] * 8


@dataclass
class BatchResult:
    applied: int = 0  # events whose version-free effects or a delta were written now
    duplicates: int = 0  # events whose effects were all there already
    erased: int = 0  # events naming an erased person or device (redis_keys.erased): dropped, not applied
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason (script errors)
    unresolved: list[int] = field(default_factory=list)  # still conflicting after the retries
    changed: dict[str, tuple[str | None, Event]] = field(
        default_factory=dict
    )  # person -> (session, last event)


Deltas = dict[tuple[str, str], tuple[np.ndarray, int]]  # (person, version) -> delta, event count


def _delta_keys(pairs: Sequence[tuple[str, str]]) -> list[str]:
    keys = []
    for person, version in pairs:
        keys += [redis_keys.user_delta(person, version), redis_keys.user_event_count(person, version)]
    return keys


def _parse_deltas(
    pairs: Sequence[tuple[str, str]], replies: Sequence[bytes | None], models: Sequence[ModelArtifacts]
) -> Deltas:
    """The MGET of `_delta_keys(pairs)` as deltas; a missing delta is zeros."""
    factors = {m.version: m.factors for m in models}
    out: Deltas = {}
    for j, (person, version) in enumerate(pairs):
        raw, count = replies[2 * j], replies[2 * j + 1]
        delta = (
            np.frombuffer(raw, dtype="<f4").copy() if raw else np.zeros(factors[version], dtype=np.float32)
        )
        out[(person, version)] = (delta, int(count or 0))
    return out


class CategoryCache:
    """item -> category, from the live item state. Misses are read with the batch's other reads;
    an item without a category yet is not cached (its catalog record may come later), and a catalog
    update that moves an item is forgotten at once (`forget`)."""

    def __init__(self, max_size: int = 500_000) -> None:
        self.max_size = max_size
        self.known: dict[str, str] = {}

    def missing(self, items: set[str]) -> list[str]:
        return [i for i in items if i not in self.known]

    def fill(self, items: Sequence[str], categories: Sequence[bytes | None]) -> None:
        if len(self.known) + len(items) > self.max_size:
            self.known.clear()  # bounded memory; a refill costs one read per item
        for item, category in zip(items, categories, strict=True):
            if category:
                self.known[item] = category.decode()

    def get(self, item: str) -> str:
        return self.known.get(item, "")

    def forget(self, item: str) -> None:
        self.known.pop(item, None)


def person_of(event: Event, aliases: dict[str, str]) -> str:
    """The identity an event's state is kept under: the user, else the device's alias, else the device."""
    return event.user_id or aliases.get(event.anonymous_id) or event.anonymous_id


def received_s(event: Event) -> float:
    assert event.received_at is not None  # consumers stamp it from the entry id when missing
    return event.received_at.timestamp()


@dataclass
class _Sent:
    """One attempt's script calls, written to the lane; their replies are read by `_collect`."""

    todo: list[int]  # batch indices of the events sent, in order
    persons: list[str]
    sessions: list[str]
    personal: list[bool]  # whether each may build person-level state (consent)
    expected: Deltas  # (person, version) -> delta, count once applied


@dataclass(eq=False)
class Started:
    """A batch whose script calls may still be running in Redis; `Applier.finish` completes it."""

    number: int  # in start order
    events: Sequence[Event]
    models: Sequence[ModelArtifacts]
    base: bool
    now_s: float | None
    result: BatchResult = field(default_factory=BatchResult)
    sent: _Sent | None = None
    done: bool = False  # every reply read and every conflict retried


@dataclass
class StateRead:
    """The reads a batch is planned on, written to a lane: the tombstones and consent withdrawals of the
    ids it names, the devices' aliases, the signed-in users' deltas and the uncached categories. Batches numbered `since`
    and later may change what was read, so their planned deltas override it."""

    lane: Lane
    ids: list[str]
    devices: list[str]
    stored: list[tuple[str, str]]
    uncached: list[str]
    since: int


class Applier:
    """Applies events' effects exactly once; see apply_events.lua for the atomic part.

    `apply` does a batch from start to end. The consumer's loop overlaps batches instead: `start`
    plans a batch and writes its script calls, `finish` reads their replies later, so Python plans
    batch n+1 while Redis applies batch n. All calls go through one connection (the lane), so Redis
    applies batches in the order they were started. A batch's reads can be sent ahead (`read_state`,
    before the batch in front of it is written): a read sent behind a batch's scripts waits for them.
    A batch is planned on the deltas the batches started before it will leave; when that guess fails
    (another consumer wrote the same person, or an event failed), everything in flight is read first
    and the conflicts are retried in order, sequentially, on fresh reads.
    """

    def __init__(self, client: redis.Redis, settings: Settings, seed: int = 0) -> None:
        self.client = client
        self.settings = settings
        self.speed = settings.speed
        self.categories = CategoryCache()
        self.rng = np.random.default_rng(seed)
        self.lane = Lane(client)  # the script calls
        self.reads = Lane(client)  # reads sent ahead, taken in order by `start`
        self.reads_now = Lane(client)  # reads taken at once (retries, `apply`)
        self.in_flight: list[Started] = []
        self.recent: deque[Started] = deque(maxlen=4)  # started batches, finished or not, for overlays
        self.started = 0
        client.script_load(APPLY_EVENTS.source)
        # The script builds keys it only learns inside Redis (a session's other items) from these.
        covis, nb_session, nb_item = (
            redis_keys.template(key_of)
            for key_of in (redis_keys.covisitation, redis_keys.neighbour_session, redis_keys.item_sessions)
        )
        self.key_templates = dict(
            covis_prefix=covis[0], covis_suffix=covis[1], nb_session_prefix=nb_session[0],
            nb_session_suffix=nb_session[1], nb_item_prefix=nb_item[0], nb_item_suffix=nb_item[1],
        )  # fmt: skip
        self.merge_script = client.register_script(MERGE_IDENTITY.source)

    # ------------------------------------------------------------ batches

    def apply(
        self,
        events: Sequence[Event],
        models: Sequence[ModelArtifacts],
        base: bool = True,
        now_s: float | None = None,
    ) -> BatchResult:
        """Apply events in order; `models` are the versions whose deltas to update (at most two)."""
        return self.finish(self.start(events, models, base, now_s))

    def start(
        self,
        events: Sequence[Event],
        models: Sequence[ModelArtifacts],
        base: bool = True,
        now_s: float | None = None,
        state: StateRead | None = None,
    ) -> Started:
        """Plan the batch (on `state`, its reads sent ahead, if given) and write its script calls
        without waiting for them.

        A batch with an identify is applied at once instead: the merge must see every earlier event
        applied, and the events after it must see the device's new alias."""
        started = Started(self.started, events, models, base, now_s)
        self.started += 1
        self.recent.append(started)
        if base and any(e.event_type is EventType.IDENTIFY and e.personalised for e in events):
            if state is not None:
                self._receive_state(events, models, state)  # its replies are next in the lane
            self.drain()
            self._apply_around_identifies(started)
            started.done = True
            return started
        try:
            started.sent = self._send(started, list(range(len(events))), state)
        except BaseException:
            self.reset()
            raise
        self.in_flight.append(started)
        return started

    def read_state(self, events: Sequence[Event], models: Sequence[ModelArtifacts]) -> StateRead:
        """Send the reads that `start` will plan these events on; `start` must get them in order."""
        return self._send_state_reads(events, models, self.reads)

    def finish(self, started: Started) -> BatchResult:
        """Read the replies of the batch and of the batches started before it; retry conflicts."""
        try:
            while not started.done:
                if not self.in_flight:
                    raise RuntimeError("the batch was dropped by a reset: its events are not all applied")
                oldest = self.in_flight.pop(0)
                assert oldest.sent is not None
                retry = self._collect(oldest, oldest.sent)
                if retry:
                    self._retry_in_order([(oldest, retry)])
                oldest.done = True
        except BaseException:
            self.reset()
            raise
        return started.result

    def drain(self) -> None:
        """Finish every started batch."""
        if self.in_flight:
            self.finish(self.in_flight[-1])

    def reset(self) -> None:
        """Forget the batches in flight (their events stay unacknowledged) and drop the lanes."""
        self.in_flight.clear()
        for lane in (self.lane, self.reads, self.reads_now):
            lane.reset()

    def _retry_in_order(self, conflicts: list[tuple[Started, list[int]]]) -> None:
        """Later batches were planned on the deltas of the conflicting ones: read their replies too,
        then retry everything in the order it was started, with nothing in flight."""
        while self.in_flight:
            later = self.in_flight.pop(0)
            assert later.sent is not None
            conflicts.append((later, self._collect(later, later.sent)))
        for started, todo in conflicts:
            self._apply_now(started, todo)
            started.done = True

    def _apply_around_identifies(self, started: Started) -> None:
        first = 0
        for i, event in enumerate(started.events):
            if event.event_type is EventType.IDENTIFY:
                self._apply_now(started, list(range(first, i)))
                self._identify(i, event, started.result)
                first = i + 1
        self._apply_now(started, list(range(first, len(started.events))))

    def _apply_now(self, started: Started, todo: list[int]) -> None:
        """Apply `todo` with nothing else in flight, retrying conflicts up to speed.conflict_retries times."""
        for _ in range(self.speed.conflict_retries):
            if not todo:
                return
            sent = self._send(started, todo)
            if started.sent is not None:  # later batches' reads overlay what this one now leaves
                started.sent.expected.update(sent.expected)
            todo = self._collect(started, sent)
        started.result.unresolved.extend(todo)

    def _send(self, started: Started, todo: list[int], state: StateRead | None = None) -> _Sent:
        """Plan the events `todo` of the batch on the deltas Redis will hold once the batches started
        before are applied, and write their script calls to the lane, a chunk at a time."""
        now = time.time() if started.now_s is None else started.now_s
        models = started.models
        batch = [started.events[i] for i in todo]
        if state is None:
            state = self._send_state_reads(batch, models, self.reads_now)
        persons, personal, deltas, erased = self._receive_state(batch, models, state)
        if erased:
            kept = [j for j, event in enumerate(batch) if erased.isdisjoint(event.person_ids)]
            started.result.erased += len(batch) - len(kept)
            todo, batch = [todo[j] for j in kept], [batch[j] for j in kept]
            persons, personal = [persons[j] for j in kept], [personal[j] for j in kept]
        sessions = [e.session_id or NO_SESSION for e in batch]
        planner = _Planner(self, batch, persons, personal, sessions, self.categories, now)
        expected = planner.plan_deltas(models, deltas)

        chunk = self.speed.script_chunk
        for first in range(0, len(batch), chunk):
            part = range(first, min(first + chunk, len(batch)))
            keys: list[str] = []
            event_args: list[object] = []
            for j in part:
                planner.plan(j, keys, event_args)
            args = APPLY_EVENTS.argv.pack(
                **self._chunk_constants(len(part), started.base, models[:2]), event=event_args
            )
            APPLY_EVENTS.check(keys, args)
            self.lane.send("EVALSHA", APPLY_EVENTS.sha, len(keys), *keys, *args)
        return _Sent(todo, persons, sessions, personal, expected)

    def _collect(self, started: Started, sent: _Sent) -> list[int]:
        """Read an attempt's replies into the batch's result; returns the indices to retry: a delta
        moved underneath, the script was not loaded, or an earlier event of the chunk failed."""
        chunk, result = self.speed.script_chunk, started.result
        parts = [
            range(first, min(first + chunk, len(sent.todo))) for first in range(0, len(sent.todo), chunk)
        ]
        retry: list[int] = []
        for part, reply in zip(parts, self.lane.read(len(parts)), strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted and lost its scripts: nothing ran
                self.client.script_load(APPLY_EVENTS.source)
                reply = []
            elif isinstance(reply, Exception):  # the call itself was refused: nothing ran
                reply = [str(reply).encode()] + [-1] * (len(part) - 1)
            if reply and isinstance(reply[-1], list):  # some deferred writes failed; the events applied
                log.error("chunk applied, but %s", reply.pop()[0].decode(errors="replace"))
            for j, code in zip_longest(part, reply):
                index = sent.todo[j]
                if code is None or code == -1:  # not reached, or its delta moved: plan it again
                    retry.append(index)
                elif isinstance(code, bytes):
                    result.failed[index] = code.decode(errors="replace")
                elif code == 0:
                    result.duplicates += 1
                else:
                    result.applied += 1
                    event = started.events[index]
                    # A hover changes no list, nor does an event without personalisation consent.
                    if sent.personal[j] and event.event_type.value not in ATTENTION_EVENTS:
                        result.changed[sent.persons[j]] = (sent.sessions[j], event)
        return retry

    def _chunk_constants(
        self, events: int, base: bool, models: Sequence[ModelArtifacts]
    ) -> dict[str, object]:
        """The chunk's ARGV head and version names, by the script's names."""
        speed = self.speed
        return dict(
            **self.key_templates,
            event_count=events, apply_base=1 if base else 0, session_ttl=speed.session_ttl_s,
            recent_n=speed.recent_items, dedup_ttl=speed.dedup_ttl_s, affinity_half_life=speed.affinity_half_life_s,
            history_ttl=speed.history_ttl_s, purchases_kept=speed.purchases_kept,
            bestsellers_kept=speed.bestsellers_top_n, covis_kept=speed.covis_top_n, delta_ttl=speed.dedup_ttl_s,
            covis_window=speed.covis_steps, nb_kept=speed.neighbour_sessions_per_item, nb_ttl=speed.neighbour_session_ttl_s,
            n_versions=len(models), version=[m.version for m in models],
        )  # fmt: skip

    def _send_state_reads(
        self, batch: Sequence[Event], models: Sequence[ModelArtifacts], lane: Lane
    ) -> StateRead:
        ids = sorted({i for e in batch for i in e.person_ids})
        devices = sorted({e.anonymous_id for e in batch if e.user_id is None and e.personalised})
        users = {e.user_id for e in batch if e.user_id is not None and e.personalised}
        since = self.in_flight[0].number if self.in_flight else self.started
        stored = self._stored_to_read(users, models, {})
        uncached = self.categories.missing({e.item_id for e in batch if e.item_id})
        if ids:  # one command: tombstones, then withdrawals
            lane.send(
                "MGET", *[redis_keys.erased(i) for i in ids], *[redis_keys.consent_withdrawal(i) for i in ids]
            )
        if devices:
            lane.send("MGET", *[redis_keys.alias(d) for d in devices])
        if stored:
            lane.send("MGET", *_delta_keys(stored))
        for item in uncached:
            lane.send("HGET", redis_keys.item_state(item), "category")
        return StateRead(lane, ids, devices, stored, uncached, since)

    def _receive_state(
        self, batch: Sequence[Event], models: Sequence[ModelArtifacts], state: StateRead
    ) -> tuple[list[str], list[bool], Deltas, set[str]]:
        """Each event's person and whether it may build person-level state (its consent, capped by the
        withdrawals recorded after it), the deltas to plan on, and the ids among the batch's that are
        erased; fills the category cache. People reached through an alias need one more read (rare: a device's
        events after its login)."""
        ids, devices, stored, uncached = state.ids, state.devices, state.stored, state.uncached
        replies = state.lane.read(bool(ids) + bool(devices) + bool(stored) + len(uncached))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if uncached:
            self.categories.fill(uncached, replies[-len(uncached) :])
            del replies[-len(uncached) :]
        erased: set[str] = set()
        personal = [e.personalised for e in batch]
        if ids:
            marks = replies.pop(0)
            erased = {i for i, tomb in zip(ids, marks[: len(ids)], strict=True) if tomb}
            withdrawals = consent.parse_many(ids, marks[len(ids) :])
            if withdrawals:  # rare: a person withdrew while their earlier events were on their way
                personal = [
                    p and consent.applied_consent(e, withdrawals) is Consent.PERSONALISATION
                    for p, e in zip(personal, batch, strict=True)
                ]
        aliases = (
            {d: v.decode() for d, v in zip(devices, replies.pop(0), strict=True) if v} if devices else {}
        )
        deltas = _parse_deltas(stored, replies.pop(0), models) if stored else {}

        persons = [person_of(e, aliases) for e in batch]
        linked = {p for p, mine in zip(persons, personal, strict=True) if mine}
        deltas.update(self._planned_since(state.since, linked, models))
        more = self._stored_to_read(linked, models, deltas)
        if more:
            stored_deltas = cast(list[bytes | None], self.client.mget(_delta_keys(more)))
            deltas.update(_parse_deltas(more, stored_deltas, models))
        return persons, personal, deltas, erased

    def _planned_since(self, since: int, persons: set[str], models: Sequence[ModelArtifacts]) -> Deltas:
        """The persons' deltas as the batches numbered `since` and later planned to leave them."""
        versions = {m.version for m in models}
        out: Deltas = {}
        for started in self.recent:
            if started.number >= since and started.sent is not None:
                out.update(
                    (key, value)
                    for key, value in started.sent.expected.items()
                    if key[0] in persons and key[1] in versions
                )
        return out

    @staticmethod
    def _stored_to_read(
        persons: set[str], models: Sequence[ModelArtifacts], known: Deltas
    ) -> list[tuple[str, str]]:
        """(person, version) pairs with a batch vector whose delta is not known yet."""
        wanted = {(p, m.version) for p in persons for m in models if m.user_index.get(p) is not None}
        return sorted(wanted - known.keys())

    # ------------------------------------------------------------ identify

    def _identify(self, index: int, event: Event, result: BatchResult) -> None:
        """Merge the device's sessions, items and purchases into the user's; alias the device."""
        user, device = event.user_id, event.anonymous_id
        assert user is not None  # the event schema requires it for identify
        if device == user:
            return
        if redis_keys.erased_among(self.client, event.person_ids):
            result.erased += 1  # linking an erased user or device would bring their state back
            return
        withdrawals = consent.read_withdrawals(self.client, event.person_ids)
        if consent.applied_consent(event, withdrawals) is not Consent.PERSONALISATION:
            return  # an alias and a merged history are person-level state
        stored_sessions = cast(list[bytes], self.client.zrange(redis_keys.person_sessions(device), 0, -1))
        sessions = [s.decode() for s in stored_sessions]
        session_keys: list[str] = []
        for session in sessions:
            session_keys += _MERGE_SESSION_KEYS(
                recent_device=redis_keys.session_recent(device, session),
                cats_device=redis_keys.session_categories(device, session),
                cart_device=redis_keys.session_cart(device, session),
                counts_device=redis_keys.session_counts(device, session),
                recent_user=redis_keys.session_recent(user, session),
                cats_user=redis_keys.session_categories(user, session),
                cart_user=redis_keys.session_cart(user, session),
                counts_user=redis_keys.session_counts(user, session),
            )
        keys = MERGE_IDENTITY.keys.pack(
            seen_user=redis_keys.seen_events(user),
            seen_device=redis_keys.seen_events(device),
            alias_device=redis_keys.alias(device),
            sessions_device=redis_keys.person_sessions(device),
            sessions_user=redis_keys.person_sessions(user),
            items_device=redis_keys.person_items(device),
            items_user=redis_keys.person_items(user),
            purchases_device=redis_keys.person_purchases(device),
            purchases_user=redis_keys.person_purchases(user),
            devices_user=redis_keys.person_devices(user),
            session=session_keys,
        )
        speed = self.speed
        args = MERGE_IDENTITY.argv.pack(
            user_id=user,
            history_ttl=speed.history_ttl_s,
            session_ttl=speed.session_ttl_s,
            dedup_ttl=speed.dedup_ttl_s,
            affinity_half_life=speed.affinity_half_life_s,
            identify_mark=redis_keys.seen_field(event.event_id),
            anonymous_id=device,
        )
        MERGE_IDENTITY.check(keys, args, sessions=len(sessions))
        try:
            merged = self.merge_script(keys=keys, args=args)
        except redis.ResponseError as exc:
            result.failed[index] = f"identify merge failed: {exc}"
            return
        if merged:
            result.applied += 1
            result.changed[user] = (event.session_id, event)
        else:
            result.duplicates += 1


class _Planner:
    """Plans one batch's events into the script's key and value blocks (see apply_events.lua).

    Deltas chain in memory through the batch: a person's second event plans on the delta their
    first one will write. Key names are built once per person, session and item.
    """

    def __init__(
        self,
        applier: Applier,
        batch: Sequence[Event],
        persons: Sequence[str],
        personal: Sequence[bool],
        sessions: Sequence[str],
        categories: CategoryCache,
        now: float,
    ) -> None:
        self.speed = applier.speed
        self.training = applier.settings.training
        self.rng = applier.rng
        self.batch, self.persons, self.personal, self.sessions = batch, persons, personal, sessions
        # Read once: an enum's `.value` is a descriptor call, and each event needs it three times.
        self.types = [e.event_type.value for e in batch]
        self.weights = [
            implicit_weight(t, e.dwell_ms, self.training) for t, e in zip(self.types, batch, strict=True)
        ]
        self.categories = categories
        self.now = now
        # Per version slot (at most two): the model and event index -> (new delta, count it replaces).
        self.deltas: list[tuple[ModelArtifacts, dict[int, tuple[np.ndarray, int]]]] = []
        self.person_keys: dict[tuple[str, str], list[str]] = {}
        self.version_keys: dict[tuple[str, str], list[str]] = {}
        self.seen_keys: dict[str, str] = {}
        self.tokens: dict[tuple[str, str], str] = {}
        self.item_keys: dict[str, str] = {}

    def plan_deltas(self, models: Sequence[ModelArtifacts], stored: Deltas) -> Deltas:
        """SGD steps for every event with a delta, vectorised over the people in the batch; returns
        the (person, version) deltas and counts the batch leaves once applied."""
        after: Deltas = {}
        for model in models[:2]:
            self.deltas.append((model, self._model_deltas(model, stored, after)))
        return after

    def _model_deltas(
        self,
        model: ModelArtifacts,
        stored: Deltas,
        after: Deltas,
    ) -> dict[int, tuple[np.ndarray, int]]:
        # Round r takes each person's r-th event: a person's steps chain, and a round is one matrix step.
        rounds: list[list[tuple[int, int, int]]] = []  # (event index, user row, item row)
        seen_per_person: dict[str, int] = {}
        cutoff_s = model.cutoff_s
        for j, (event, person, weight) in enumerate(zip(self.batch, self.persons, self.weights, strict=True)):
            if weight <= 0 or event.item_id is None or received_s(event) < cutoff_s:
                continue  # before the cutoff the batch vector already holds the event
            if not self.personal[j]:
                continue  # a delta is person-level state
            user_row, item_row = model.user_index.get(person), model.item_index.get(event.item_id)
            if user_row is None or item_row is None:
                continue
            r = seen_per_person.get(person, 0)
            seen_per_person[person] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append((j, user_row, item_row))

        speed, k = self.speed, model.factors
        current = after  # starts empty for this version; what is not there yet is as stored
        out: dict[int, tuple[np.ndarray, int]] = {}
        for steps in rounds:
            index = [j for j, _, _ in steps]
            keys = [(self.persons[j], model.version) for j in index]
            before = [
                current.get(key) or stored.get(key) or (np.zeros(k, dtype=np.float32), 0) for key in keys
            ]
            negatives = self.rng.integers(0, len(model.item_ids), size=(len(steps), speed.negatives))
            confidences = 1.0 + self.training.alpha * np.array([self.weights[j] for j in index])
            updated = sgd_steps(
                model.user_factors[[u for _, u, _ in steps]], np.stack([d for d, _ in before]),
                model.item_factors[[i for _, _, i in steps]], model.item_factors[negatives], confidences,
                speed.learning_rate, speed.l2, speed.max_delta_norm,
            )  # fmt: skip
            for row, (j, key, (_, count)) in enumerate(zip(index, keys, before, strict=True)):
                current[key] = (updated[row], count + 1)
                out[j] = (updated[row], count)
        return out

    def plan(self, j: int, keys: list[str], args: list[object]) -> None:
        """Append event j's blocks to `keys` and `args`."""
        event, person, session, weight = self.batch[j], self.persons[j], self.sessions[j], self.weights[j]
        personal, event_type = self.personal[j], self.types[j]
        speed = self.speed
        # An attention event is counted for its session only: planned as an event without an item.
        item = "" if event_type in ATTENTION_EVENTS else event.item_id or ""
        ts = event.ts.timestamp()
        category = self.categories.get(item) if item else ""

        version_keys: list[str] = []
        version_args: list[object] = []
        for model, steps in self.deltas:
            step = steps.get(j)
            version_keys += (
                self._version_keys(person, model.version) if personal else _UNLINKED_PERSON_KEYS[:2]
            )
            version_args += (
                _VERSION_ARGS(delta="", delta_count=0)
                if step is None
                else _VERSION_ARGS(delta=step[0].astype("<f4").tobytes(), delta_count=step[1])
            )

        bucket = int(ts // speed.trending_bucket_s) * speed.trending_bucket_s
        trend_expire = bucket + speed.trending_window_s + speed.trending_bucket_s
        day = day_index(ts)
        pop_expire = int((day + POP_DAYS + 1) * DAY_S)
        best = 0.0
        if category and event_type in BESTSELLER_EVENTS:
            best = weight * (event.quantity or 1) * forward_decay(ts, speed.bestsellers_half_life_s)

        if personal:
            recent, cats, cart, counts, sessions, person_items, purchases, clicked = self._person_keys(
                person, session
            )
            seen, token = self._seen_key(person), self._token(person, session)
        else:
            recent, cats, cart, counts, sessions, person_items, purchases, clicked = _UNLINKED_PERSON_KEYS
            seen, token, session = redis_keys.SEEN_UNLINKED, "", ""
        keys += _EVENT_KEYS(
            seen=seen, recent=recent, cats=cats, cart=cart, counts=counts, sessions=sessions,
            person_items=person_items, purchases=purchases, trend_bucket=redis_keys.trending_bucket(bucket),
            popularity_day=redis_keys.popularity_day(day),
            category_bestsellers=redis_keys.category_bestsellers(category or "-"),
            covis=self._covis_key(item or "-"), clicked=clicked, per_version=version_keys,
        )  # fmt: skip
        args += _EVENT_ARGS(
            event_type=event_type, item=item, session=session, ts=repr(ts), weight=repr(weight),
            quantity=event.quantity or 1, category=category,
            trend_expireat=trend_expire if trend_expire > self.now else 0,
            popularity_expireat=pop_expire if pop_expire > self.now else 0,
            bestseller_increment=repr(best), event_id=event.event_id, session_token=token,
            personal=1 if personal else 0,
            served=redis_keys.bandit_served(event.rec_request_id) if event.rec_request_id else "",
            per_version=version_args,
        )  # fmt: skip

    def _person_keys(self, person: str, session: str) -> list[str]:
        """recent, cats, cart, counts, sessions, person_items, purchases, clicked (as `plan` names them)."""
        found = self.person_keys.get((person, session))
        if found is None:
            found = self.person_keys[(person, session)] = [
                redis_keys.session_recent(person, session),
                redis_keys.session_categories(person, session),
                redis_keys.session_cart(person, session),
                redis_keys.session_counts(person, session),
                redis_keys.person_sessions(person),
                redis_keys.person_items(person),
                redis_keys.person_purchases(person),
                redis_keys.session_clicked(person, session),
            ]
        return found

    def _version_keys(self, person: str, version: str) -> list[str]:
        found = self.version_keys.get((person, version))
        if found is None:
            found = self.version_keys[(person, version)] = _VERSION_KEYS(
                delta=redis_keys.user_delta(person, version),
                delta_count=redis_keys.user_event_count(person, version),
            )
        return found

    def _token(self, person: str, session: str) -> str:
        found = self.tokens.get((person, session))
        if found is None:
            found = self.tokens[(person, session)] = session_token(person, session)
        return found

    def _seen_key(self, person: str) -> str:
        found = self.seen_keys.get(person)
        if found is None:
            found = self.seen_keys[person] = redis_keys.seen_events(person)
        return found

    def _covis_key(self, item: str) -> str:
        found = self.item_keys.get(item)
        if found is None:
            found = self.item_keys[item] = redis_keys.covisitation(item)
        return found
