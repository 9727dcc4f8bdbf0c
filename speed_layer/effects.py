"""Apply a batch of events to Redis: plan each event's effects in Python, run them as pipelined Lua calls.

Python computes what needs the model (SGD deltas) and what needs lookups (categories, aliases,
the session's other items); the Lua script applies it with the dedup marker in one atomic step.
The same applier serves the live consumers (version-free effects plus the deltas of the current
and pending versions) and the version-switch replay (one version's deltas only).

On Redis Cluster (`split`) a script touches one slot, so an event's effects take two steps: its
person's effects in one apply_events.lua call in the person's slot, with the person's dedup marker,
which also records and returns the event's global plan (the items it co-visits, whether it entered
its session); then its global effects (trending, popularity, bestsellers, co-visits, session-kNN),
one apply_globals.lua call per slot group, each with the group's own marker of the event. The
guarantee: an event's person effects and its effects in each group are each applied exactly once.
A crash between the calls leaves the event unacknowledged; its retry finds the person's marker set
and gets the stored plan back (nothing counted twice there), and re-sends the global calls, which
apply in each group only what its marker says is missing (nothing lost, nothing twice). Until that
retry, the global effects lag the person's: readers may see one without the other meanwhile. The
calls of a batch are pipelined, so it costs one round trip per node for the persons' calls and one
for the groups' calls. An identify's merge spans the device's and the user's slots: there it runs as
steps that each apply once (`Applier._merge_in_steps`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, cast

import numpy as np
import redis
from redis.exceptions import NoScriptError

from common import consent, redis_keys
from common.events import ATTENTION_EVENTS, BESTSELLER_EVENTS, Consent, Event, EventType
from common.features import DAY_S, POP_DAYS, day_index, implicit_weight
from common.lua import Script
from common.messages import CHANGES_HEAD, CHANGES_TAIL, change_json
from common.model import ModelArtifacts
from common.neighbours import session_token
from common.redis_server import is_cluster
from common.sequence import FOLLOW_UNIT, follow_units
from common.settings import Settings, SpeedSettings
from common.speed_state import forward_decay
from common.vectors import sgd_steps
from speed_layer.scripts import APPLY_EVENTS, APPLY_GLOBALS, DETACH_DEVICE, MERGE_IDENTITY
from speed_layer.sender import ClusterLane, Lane, lane_for

log = logging.getLogger(__name__)

# Builders of the scripts' blocks by their declared names (speed_layer/*.lua headers).
_HOLDER_KEYS = APPLY_EVENTS.keys.packer("holder")
_HOLDER_ARGS = APPLY_EVENTS.argv.packer("holder")
_EVENT_KEYS = APPLY_EVENTS.keys.packer("event")
_EVENT_ARGS = APPLY_EVENTS.argv.packer("event")
_VERSION_KEYS = APPLY_EVENTS.keys.packer("per_version")
_VERSION_ARGS = APPLY_EVENTS.argv.packer("per_version")
_MERGE_SESSION_KEYS = MERGE_IDENTITY.keys.packer("session")
_RESTORE = MERGE_IDENTITY.argv.packer("restore")
_GLOBAL_OP = APPLY_GLOBALS.argv.packer("op")

NO_SESSION = "_"  # session id of events sent without one
CALLS_PER_BATCH = 5  # the script calls a batch aims at: Redis applies each while the next is planned
# The person keys of an event applied without personalisation consent: the script touches only the
# first (its dedup marker), so no key of the person is named.
_UNLINKED_PERSON_KEYS = [redis_keys.SEEN_UNLINKED] * 8
# The device's keys an identify merges into the user's, by part name (detach_device.lua stashes them
# under it): the person's, then each session's as "<part>:<session>". The first _KEPT stay with the
# device until the alias is set (`Applier._merge_in_steps`).
_PERSON_PARTS = {
    "seen": redis_keys.seen_events, "plans": redis_keys.global_plans, "sessions": redis_keys.person_sessions,
    "items": redis_keys.person_items, "purchases": redis_keys.person_purchases,
}  # fmt: skip
_KEPT = 2
_SESSION_PARTS = {
    "recent": redis_keys.session_recent, "cats": redis_keys.session_categories, "cart": redis_keys.session_cart,
    "counts": redis_keys.session_counts, "clicked": redis_keys.session_clicked,
}  # fmt: skip


def _device_parts(sessions: Sequence[str]) -> list[str]:
    return [*_PERSON_PARTS, *(f"{part}:{session}" for session in sessions for part in _SESSION_PARTS)]


def _device_key(device: str, part: str) -> str:
    name, _, session = part.partition(":")
    return _PERSON_PARTS[name](device) if name in _PERSON_PARTS else _SESSION_PARTS[name](device, session)


@dataclass
class BatchResult:
    applied: int = 0  # events whose version-free effects or a delta were written now
    duplicates: int = 0  # events whose effects were all there already
    erased: int = 0  # events naming an erased person or device (redis_keys.erased): dropped, not applied
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason (script errors)
    unresolved: list[int] = field(default_factory=list)  # still conflicting after the retries
    # person -> (session, last event) of those an identify's merge changed, for the consumer to announce
    # (apply_events.lua announces the events it applies itself)
    changed: dict[str, tuple[str | None, Event]] = field(default_factory=dict)


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


class GlobalKeys:
    """Names of the keys of no person an event writes (trending bucket, popularity day, bestsellers),
    remembered across batches: most carry a slot group, a SHA-1 of the id, and popular categories come
    back in every batch. Bounded like CategoryCache."""

    def __init__(self, max_size: int = 500_000) -> None:
        self.max_size = max_size
        self.known: dict[tuple[str, object], str] = {}

    def get(self, family: str, key_id: object) -> str:
        found = self.known.get((family, key_id))
        if found is None:
            if len(self.known) >= self.max_size:
                self.known.clear()
            found = self.known[(family, key_id)] = _GLOBAL_KEY_OF[family](key_id)
        return found


class PersonKeys:
    """Names of a person's keys (their session's, their dedup markers and plans, their deltas) and their
    sessions' tokens, remembered across batches like GlobalKeys: a visitor browsing comes back a batch
    or two later (1,000 at once at 10,000 events/s), and the eleven names and a SHA-1 cost ~2.3 us to
    make again, one event in one batch. Bounded: all forgotten at once past max_size sessions."""

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self.session: dict[tuple[str, str], list[str]] = {}  # (person, session) -> `_Planner._person_keys`
        self.versions: dict[tuple[str, str], list[str]] = {}  # (person, version) -> delta, delta count
        self.seen: dict[str, tuple[str, str]] = {}  # person -> seen, plans
        self.tokens: dict[tuple[str, str], str] = {}  # (person, session) -> session token

    def bounded(self) -> PersonKeys:
        """Itself, forgotten first when it holds max_size sessions (checked once a batch)."""
        if len(self.session) >= self.max_size:  # the others grow with it (a token a session, a person's keys)
            for known in (self.session, self.versions, self.seen, self.tokens):
                known.clear()
        return self


_GLOBAL_KEY_OF: dict[str, Callable[[Any], str]] = {
    "trend": redis_keys.trending_bucket,
    "pop": redis_keys.popularity_day,
    "best": redis_keys.category_bestsellers,
}


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
    expected: Deltas  # (person, version) -> delta, count once applied
    parts: list[list[int]]  # positions in `todo` of each script call, in the order sent
    globals: dict[int, EventGlobals] = field(default_factory=dict)  # split: position -> its global effects
    unlinked: list[int] = field(default_factory=list)  # split: positions with global effects only


@dataclass
class _Call:
    """One apply_events.lua call as it is planned: its holders (a person's session, whose keys and values
    its events share, named once) and its events' blocks."""

    trend_versions: str = redis_keys.TRENDING_VERSIONS  # split: the person's seen key (see `_Planner.plan`)
    holders: dict[tuple[str, str] | None, int] = field(default_factory=dict)  # (person, session) -> position, from 1
    holder_keys: list[str] = field(default_factory=list)
    holder_args: list[object] = field(default_factory=list)
    event_keys: list[str] = field(default_factory=list)
    event_args: list[object] = field(default_factory=list)


@dataclass(frozen=True)
class EventGlobals:
    """What an event adds to keys of no person, as apply_events.lua's aggregates and co-visits would:
    planned in Python, applied per slot group by apply_globals.lua (split)."""

    event_id: str
    item: str
    ts: str  # the event time as the time-scored sets keep it (redis_keys.time_score)
    weight: float
    trend_key: str
    trend_expireat: int  # 0: not counted (its bucket has left the window)
    popularity_key: str
    popularity_expireat: int
    bestsellers_key: str
    bestseller_increment: float  # 0: none
    token: str  # the session's neighbour token ('' without personalisation)
    served: str  # the served list's record the event names (redis_keys.bandit_served), '' none


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

    lane: Lane | ClusterLane
    ids: list[str]
    devices: list[str]
    stored: list[tuple[str, str]]
    uncached: list[str]
    since: int


def chunk_size(events: int, speed: SpeedSettings) -> int:
    """Events a script call of a batch of `events` applies: CALLS_PER_BATCH calls, but at least
    `script_chunk_min` events a call and at most `script_chunk`. A backlog's full batch (500) goes in
    calls of 100, which write the hot keys (trending, popularity, bestsellers, popular items' co-visit
    rows) once for more events; a live rate's small batches in calls of 50, whose overlap with the
    planning keeps its effects fresh (both measured: README, the speed rows)."""
    return min(speed.script_chunk, max(speed.script_chunk_min, -(-events // CALLS_PER_BATCH)))


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

    def __init__(self, client: redis.Redis, settings: Settings, seed: int = 0, split: bool | None = None) -> None:
        self.client = client
        self.settings = settings
        self.speed = settings.speed
        self.categories = CategoryCache()
        self.rng = np.random.default_rng(seed)
        redis_settings = settings.redis
        # The script calls; on a cluster a batch's writes count once on the replicas (failover-safe).
        self.lane = lane_for(client, redis_settings.cluster_replica_acks, redis_settings.cluster_replica_timeout_ms)
        # Split: the groups' calls and an identify's steps, sent and read at once (the script lane may
        # hold later batches' calls).
        self.globals_lane = lane_for(client, redis_settings.cluster_replica_acks, redis_settings.cluster_replica_timeout_ms)
        self.reads = lane_for(client)  # reads sent ahead, taken in order by `start`
        self.reads_now = lane_for(client)  # reads taken at once (retries, `apply`)
        # Global effects per slot group (see the module's docstring): always on a cluster; on one
        # Redis only when asked (the one-script path is faster there).
        self.split = is_cluster(client) if split is None else split
        self.in_flight: list[Started] = []
        self.recent: deque[Started] = deque(maxlen=4)  # started batches, finished or not, for overlays
        self.started = 0
        self.last_identify = -1  # the number of the last batch applied around an identify
        client.script_load(APPLY_EVENTS.source)
        client.script_load(APPLY_GLOBALS.source)
        # The script builds keys it only learns inside Redis (a session's other items) from these.
        covis, nb_session, nb_item = (
            redis_keys.grouped_template(key_of)
            for key_of in (redis_keys.covisitation, redis_keys.neighbour_session, redis_keys.item_sessions)
        )
        self.key_templates = dict(
            covis_prefix=covis[0], covis_middle=covis[1], covis_suffix=covis[2], nb_session_prefix=nb_session[0],
            nb_session_middle=nb_session[1], nb_session_suffix=nb_session[2], nb_item_prefix=nb_item[0],
            nb_item_middle=nb_item[1], nb_item_suffix=nb_item[2], n_groups=redis_keys.SLOT_GROUPS,
        )  # fmt: skip
        self.merge_script = client.register_script(MERGE_IDENTITY.source)
        self.global_keys = GlobalKeys()
        self.person_keys = PersonKeys()

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
        identifies = base and any(e.event_type is EventType.IDENTIFY and e.personalised for e in events)
        # Reads sent before an identify was applied may hold stale aliases: a device's events planned
        # under the device would be marked where its user's retries never look (counted twice on a
        # redelivery). Those reads are taken off the lane (their replies are next) and made again.
        if state is not None and (identifies or self.last_identify >= state.since):
            self._receive_state(events, models, state)
            state = None
        if identifies:
            self.drain()
            self._apply_around_identifies(started)
            started.done = True
            self.last_identify = started.number
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
        for lane in (self.lane, self.globals_lane, self.reads, self.reads_now):
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

        parts, unlinked = self._parts(persons, personal)
        for part in parts:
            call = _Call()
            announcements = planner.announcements(part)
            for j in part:
                planner.plan(j, call, announcements.get(j, ""))
            keys = APPLY_EVENTS.keys.pack(
                trend_versions=call.trend_versions, holder=call.holder_keys, event=call.event_keys
            )
            args = APPLY_EVENTS.argv.pack(
                **self._chunk_constants(len(part), len(call.holders), started.base, models[:2]),
                holder=call.holder_args, event=call.event_args,
            )  # fmt: skip
            APPLY_EVENTS.check(keys, args)
            self.lane.send("EVALSHA", APPLY_EVENTS.sha, len(keys), *keys, *args)
        if self.split:
            for j in unlinked:
                planner.plan(j, _Call(), "")  # plans its global effects only
        return _Sent(todo, expected, parts, planner.globals, unlinked)

    def _parts(self, persons: Sequence[str], personal: Sequence[bool]) -> tuple[list[list[int]], list[int]]:
        """The script calls of a batch (positions, in order within each) and, split, the positions that
        have no person call: consecutive chunks on one Redis; split, each person's events (their one
        slot), chunked, while events without personalisation go to the groups' calls only."""
        chunk = chunk_size(len(persons), self.speed)
        if not self.split:
            return [list(range(first, min(first + chunk, len(persons)))) for first in range(0, len(persons), chunk)], []
        by_person: dict[str, list[int]] = {}
        unlinked = []
        for j, (person, mine) in enumerate(zip(persons, personal, strict=True)):
            if mine:
                by_person.setdefault(person, []).append(j)
            else:
                unlinked.append(j)
        parts = [events[first : first + chunk] for events in by_person.values() for first in range(0, len(events), chunk)]
        return parts, unlinked

    def _collect(self, started: Started, sent: _Sent) -> list[int]:
        """Read an attempt's replies into the batch's result; returns the indices to retry: a delta
        moved underneath, the script was not loaded, or an earlier event of the chunk failed."""
        result = started.result
        retry: list[int] = []
        planned: list[tuple[int, str]] = []  # split: (position, plan) of the events whose globals to apply
        for part, reply in zip(sent.parts, self.lane.read(len(sent.parts)), strict=True):
            if isinstance(reply, NoScriptError):  # Redis restarted and lost its scripts: nothing ran
                self.client.script_load(APPLY_EVENTS.source)
                reply = []
            elif isinstance(reply, Exception):  # the call itself was refused: nothing ran
                reply = [str(reply).encode()] + [-1] * (len(part) - 1)
            # Some deferred writes failed; the events applied (a split event's reply is a pair).
            if reply and isinstance(reply[-1], list) and len(reply[-1]) == 1:
                log.error("chunk applied, but %s", reply.pop()[0].decode(errors="replace"))
            for j, code in zip_longest(part, reply):
                index = sent.todo[j]
                if isinstance(code, list):  # split: the mask, and the global effects to apply
                    planned.append((j, code[1].decode()))
                    code = code[0]
                if code is None or code == -1:  # not reached, or its delta moved: plan it again
                    retry.append(index)
                elif isinstance(code, bytes):
                    result.failed[index] = code.decode(errors="replace")
                elif code == 0:
                    result.duplicates += 1
                else:
                    result.applied += 1  # and the script announced its change
        if self.split:  # events without personalisation count by their global effects
            applied = self._apply_globals(sent, planned + [(j, "") for j in sent.unlinked]) if started.base else set()
            for j in sent.unlinked:
                if j in applied:
                    result.applied += 1
                else:
                    result.duplicates += 1  # a version-switch replay writes deltas, which they have none of
        return retry

    def _apply_globals(self, sent: _Sent, planned: Sequence[tuple[int, str]]) -> set[int]:
        """Apply the global effects of the events `planned` ((position, plan)), one apply_globals.lua call
        per slot group, pipelined; returns the positions applied now in at least one group."""
        # In the batch's order: the first click on a served list takes its reward.
        calls = _group_calls([(j, sent.globals[j], plan) for j, plan in sorted(planned) if j in sent.globals], self.speed)
        for attempt in range(2):
            for keys, args, _ in calls:
                APPLY_GLOBALS.check(keys, args)
                self.globals_lane.send("EVALSHA", APPLY_GLOBALS.sha, len(keys), *keys, *args)
            replies = self.globals_lane.read(len(calls))
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                self.client.script_load(APPLY_GLOBALS.source)  # a restarted or promoted node lacks it
                continue
            break
        applied: set[int] = set()
        for (_, _, positions), reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply  # nothing of the call ran: the batch stays unacknowledged and is retried
            if reply and isinstance(reply[-1], list):
                log.error("globals applied, but %s", reply.pop()[0].decode(errors="replace"))
            applied |= {j for j, code in zip(positions, reply, strict=True) if code == 1}
        return applied

    def _chunk_constants(
        self, events: int, holders: int, base: bool, models: Sequence[ModelArtifacts]
    ) -> dict[str, object]:
        """The chunk's ARGV head and version names, by the script's names."""
        speed = self.speed
        return dict(
            **self.key_templates,
            event_count=events, holder_count=holders, apply_base=1 if base else 0, split=1 if self.split else 0, session_ttl=speed.session_ttl_s,
            recent_n=speed.recent_items, dedup_ttl=speed.dedup_ttl_s, affinity_half_life=speed.affinity_half_life_s,
            history_ttl=speed.history_ttl_s, purchases_kept=speed.purchases_kept,
            bestsellers_kept=speed.bestsellers_top_n, covis_kept=speed.covis_top_n, delta_ttl=speed.dedup_ttl_s,
            covis_window=speed.covis_steps, covis_unit=FOLLOW_UNIT, time_unit=redis_keys.TIME_SCORE_PER_S, nb_kept=speed.neighbour_sessions_per_item, nb_ttl=speed.neighbour_session_ttl_s,
            channel=redis_keys.RECS_CHANNEL, changes_head=CHANGES_HEAD, changes_tail=CHANGES_TAIL,
            n_versions=len(models), version=[m.version for m in models],
        )  # fmt: skip

    def _send_state_reads(
        self, batch: Sequence[Event], models: Sequence[ModelArtifacts], lane: Lane | ClusterLane
    ) -> StateRead:
        ids = sorted({i for e in batch for i in e.person_ids})
        devices = sorted({e.anonymous_id for e in batch if e.user_id is None and e.personalised})
        users = {e.user_id for e in batch if e.user_id is not None and e.personalised}
        since = self.in_flight[0].number if self.in_flight else self.started
        stored = self._stored_to_read(users, models, {})
        uncached = self.categories.missing({e.item_id for e in batch if e.item_id})
        # One MGET: the ids' tombstones and withdrawals, the devices' aliases, the users' deltas (a cluster
        # lane sends a GET a key). At a store's usual rate a batch is one event, and this its one read.
        keys = [
            *[redis_keys.erased(i) for i in ids], *[redis_keys.consent_withdrawal(i) for i in ids],
            *[redis_keys.alias(d) for d in devices], *_delta_keys(stored),
        ]  # fmt: skip
        calls: list[tuple[str, ...]] = [("MGET", *keys)] if keys else []
        calls.extend(("HGET", redis_keys.item_state(item), "category") for item in uncached)
        lane.send_all(calls)
        return StateRead(lane, ids, devices, stored, uncached, since)

    def _receive_state(
        self, batch: Sequence[Event], models: Sequence[ModelArtifacts], state: StateRead
    ) -> tuple[list[str], list[bool], Deltas, set[str]]:
        """Each event's person and whether it may build person-level state (its consent, capped by the
        withdrawals recorded after it), the deltas to plan on, and the ids among the batch's that are
        erased; fills the category cache. People reached through an alias need one more read (rare: a device's
        events after its login)."""
        ids, devices, stored, uncached = state.ids, state.devices, state.stored, state.uncached
        read_keys = bool(ids or devices or stored)
        replies = state.lane.read(read_keys + len(uncached))
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        if uncached:
            self.categories.fill(uncached, replies[-len(uncached) :])
        found = replies[0] if read_keys else []
        at_aliases = 2 * len(ids)
        at_deltas = at_aliases + len(devices)
        erased = {i for i, tomb in zip(ids, found[: len(ids)], strict=True) if tomb}
        aliases = {d: v.decode() for d, v in zip(devices, found[at_aliases:at_deltas], strict=True) if v}
        deltas = _parse_deltas(stored, found[at_deltas:], models) if stored else {}
        personal = [e.personalised for e in batch]
        withdrawals = consent.parse_many(ids, found[len(ids) : at_aliases])
        if withdrawals:  # rare: a person withdrew while their earlier events were on their way
            personal = [
                p and consent.applied_consent(e, withdrawals) is Consent.PERSONALISATION
                for p, e in zip(personal, batch, strict=True)
            ]

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
        try:
            merged = self._merge_in_steps(event, user, device) if self.split else self._merge_at_once(event, user, device)
        except redis.ResponseError as exc:
            result.failed[index] = f"identify merge failed: {exc}"
            return
        if merged:
            result.applied += 1
            result.changed[user] = (event.session_id, event)
        else:
            result.duplicates += 1

    def _merge_at_once(self, event: Event, user: str, device: str) -> bool:
        """One merge_identity.lua call on the device's keys and the user's (one Redis)."""
        stored_sessions = cast(list[bytes], self.client.zrange(redis_keys.person_sessions(device), 0, -1))
        sessions = [s.decode() for s in stored_sessions]
        return self._merge(event, user, device, sessions, {})

    def _merge_in_steps(self, event: Event, user: str, device: str) -> bool:
        """The merge where a script touches one slot (Redis Cluster), in steps that each apply once:
        detach_device.lua stashes the device's keys in its slot (the stash is its marker) and deletes them
        but its markers and plans; merge_identity.lua restores them in the user's slot and merges them
        under the identify's marker there, carrying the markers and plans; then the alias is set (a plain
        SET, its own slot) and the device's markers, plans and stash go. Until the alias, the device's
        events resolve to the device, whose markers and plans answer their retries; after it, to the
        user, who has them. A crash between
        the steps leaves the identify unacknowledged; its retry finds the stash (the same state) or the
        user's marker and finishes the rest, so nothing is merged twice or lost. Meanwhile the device's
        state is in neither person's keys, and an event naming the device alone (no user id) applied by
        another consumer in that window stays with the device."""
        stash_key = redis_keys.identify_stash(device, event.event_id)
        merged = False
        if self.client.zscore(redis_keys.seen_events(user), redis_keys.seen_field(event.event_id)) is None:
            stash = self._detach(device, stash_key)
            sessions = sorted({part.partition(":")[2] for part in stash if part.partition(":")[0] in _SESSION_PARTS})
            merged = self._merge(event, user, device, sessions, stash)
        elif not self.client.exists(stash_key):
            return False  # merged and finished before
        self._write_now("SET", redis_keys.alias(device), user, "EX", self.speed.history_ttl_s)
        self._write_now("DEL", *[_device_key(device, part) for part in list(_PERSON_PARTS)[:_KEPT]], stash_key)
        return merged

    def _write_now(self, *call: str | bytes | int) -> Any:
        """A step of the merge in steps: on a cluster it counts once its master's replicas have it (as the
        batches' scripts do), so a failover after the identify is acknowledged loses none of it."""
        self.globals_lane.send(*call)
        reply = self.globals_lane.read(1)[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _script_now(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A script step of the merge in steps (`_write_now`); a node that lacks the script loads it."""
        try:
            return self._write_now("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.client.script_load(script.source)
            return self._write_now("EVALSHA", script.sha, len(keys), *keys, *args)

    def _detach(self, device: str, stash_key: str) -> dict[str, bytes]:
        """detach_device.lua: the device's parts (part name -> DUMP payload) that exist."""
        stored_sessions = cast(list[bytes], self.client.zrange(redis_keys.person_sessions(device), 0, -1))
        parts = _device_parts([s.decode() for s in stored_sessions])
        keys = DETACH_DEVICE.keys.pack(stash=stash_key, part=[_device_key(device, p) for p in parts])
        args = DETACH_DEVICE.argv.pack(stash_ttl=self.speed.dedup_ttl_s, parts=len(parts), kept=_KEPT, name=parts)
        DETACH_DEVICE.check(keys, args)
        reply = cast(list[bytes], self._script_now(DETACH_DEVICE, keys, args))
        stash = {name.decode(): payload for name, payload in zip(reply[::2], reply[1::2], strict=True)}
        stash.pop("", None)
        return stash

    def _merge(self, event: Event, user: str, device: str, sessions: Sequence[str], stash: dict[str, bytes]) -> bool:
        """merge_identity.lua on the device's keys, or (`stash`, from `_detach`) on those parts restored
        into the user's slot; True when merged now."""
        split = self.split

        def device_key(part: str) -> str:
            return redis_keys.identify_scratch(user, part) if split else _device_key(device, part)

        session_keys: list[str] = []
        for session in sessions:
            session_keys += _MERGE_SESSION_KEYS(
                recent_device=device_key(f"recent:{session}"),
                cats_device=device_key(f"cats:{session}"),
                cart_device=device_key(f"cart:{session}"),
                counts_device=device_key(f"counts:{session}"),
                recent_user=redis_keys.session_recent(user, session),
                cats_user=redis_keys.session_categories(user, session),
                cart_user=redis_keys.session_cart(user, session),
                counts_user=redis_keys.session_counts(user, session),
                clicked_device=device_key(f"clicked:{session}"),
                clicked_user=redis_keys.session_clicked(user, session),
            )
        keys = MERGE_IDENTITY.keys.pack(
            seen_user=redis_keys.seen_events(user),
            seen_device=device_key("seen"),
            alias_device=redis_keys.person_placeholder(user) if split else redis_keys.alias(device),
            sessions_device=device_key("sessions"),
            sessions_user=redis_keys.person_sessions(user),
            items_device=device_key("items"),
            items_user=redis_keys.person_items(user),
            purchases_device=device_key("purchases"),
            purchases_user=redis_keys.person_purchases(user),
            devices_user=redis_keys.person_devices(user),
            plans_device=device_key("plans"),
            plans_user=redis_keys.global_plans(user),
            session=session_keys,
        )
        position = {key: i + 1 for i, key in enumerate(keys)}
        restores = [v for part, payload in stash.items() for v in _RESTORE(key=position[device_key(part)], payload=payload)]
        speed = self.speed
        args = MERGE_IDENTITY.argv.pack(
            user_id=user,
            history_ttl=speed.history_ttl_s,
            session_ttl=speed.session_ttl_s,
            dedup_ttl=speed.dedup_ttl_s,
            affinity_half_life=speed.affinity_half_life_s,
            identify_mark=redis_keys.seen_field(event.event_id),
            anonymous_id=device,
            split=1 if split else 0,
            restores=len(stash),
            device_token=[session_token(device, session) for session in sessions],
            restore=restores,
        )
        MERGE_IDENTITY.check(keys, args, sessions=len(sessions))
        if split:
            return bool(self._script_now(MERGE_IDENTITY, keys, args))
        return bool(self.merge_script(keys=keys, args=args))


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
        names = applier.person_keys.bounded()
        self.person_keys, self.version_keys, self.seen_keys, self.tokens = names.session, names.versions, names.seen, names.tokens
        self.global_keys = applier.global_keys
        self.split = applier.split
        self.globals: dict[int, EventGlobals] = {}  # split: event index -> its global effects

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

    def plan(self, j: int, call: _Call, announcement: bytes | str) -> None:
        """Append event j's blocks to the call, and its holder's when the call has none yet
        (`announcement` as `announcements` gives it)."""
        event, person, session, weight = self.batch[j], self.persons[j], self.sessions[j], self.weights[j]
        personal, event_type = self.personal[j], self.types[j]
        speed = self.speed
        # An attention event is counted for its session only: planned as an event without an item.
        item = "" if event_type in ATTENTION_EVENTS else event.item_id or ""
        ts = event.ts.timestamp()
        ts_score = str(redis_keys.time_score(event.ts))
        category = self.categories.get(item) if item else ""

        version_args: list[object] = []
        for _, steps in self.deltas:
            step = steps.get(j)
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

        holder = self._holder(call, person, session, personal)
        global_key = self.global_keys.get
        trend_key, pop_key = global_key("trend", bucket), global_key("pop", day)
        best_key = global_key("best", category or "-")
        trend_expireat = trend_expire if trend_expire > self.now else 0
        pop_expireat = pop_expire if pop_expire > self.now else 0
        served = self._served_key(event.rec_request_id)
        if self.split:
            if item or served:
                token = self._token(person, session) if personal else ""
                self.globals[j] = EventGlobals(
                    event.event_id, item, ts_score, weight, trend_key, trend_expireat, pop_key, pop_expireat,
                    best_key, best, token, served,
                )  # fmt: skip
            # The person's script touches its person's slot only: the global KEYS name its marker key
            # (a call's events are one person's).
            seen = self._seen_keys(person)[0] if personal else redis_keys.SEEN_UNLINKED
            trend_key = pop_key = best_key = call.trend_versions = seen
        call.event_keys += _EVENT_KEYS(trend_bucket=trend_key, popularity_day=pop_key, category_bestsellers=best_key)
        # The counters' skip flags go as the integer 0, which the script compares as the text '0'.
        call.event_args += _EVENT_ARGS(
            holder=holder, event_type=event_type, item=item, ts=ts_score, weight=repr(weight),
            quantity=event.quantity or 1, category=category,
            trend_expireat=trend_expireat, popularity_expireat=pop_expireat,
            bestseller_increment=repr(best) if best > 0 else 0, event_id=event.event_id,
            served=served, announcement=announcement,
            per_version=version_args,
        )  # fmt: skip

    def _holder(self, call: _Call, person: str, session: str, personal: bool) -> int:
        """The position of the person's session among the call's holders, its blocks appended when new.
        The events without personalisation consent share one holder, whose keys are the unlinked marker
        set's."""
        name = (person, session) if personal else None
        holder = call.holders.get(name)
        if holder is not None:
            return holder
        holder = call.holders[name] = len(call.holders) + 1
        if personal:
            recent, cats, cart, counts, sessions, person_items, purchases, clicked = self._person_keys(
                person, session
            )
            seen, plans = self._seen_keys(person)
            version_keys = [key for model, _ in self.deltas for key in self._version_keys(person, model.version)]
            token = self._token(person, session)
        else:
            recent, cats, cart, counts, sessions, person_items, purchases, clicked = _UNLINKED_PERSON_KEYS
            seen = plans = redis_keys.SEEN_UNLINKED
            version_keys = _UNLINKED_PERSON_KEYS[:2] * len(self.deltas)
            session, token = "", ""
        call.holder_keys += _HOLDER_KEYS(
            seen=seen, recent=recent, cats=cats, cart=cart, counts=counts, sessions=sessions,
            person_items=person_items, purchases=purchases, plans=plans, clicked=clicked,
            per_version=version_keys,
        )  # fmt: skip
        call.holder_args += _HOLDER_ARGS(session=session, session_token=token, personal=1 if personal else 0)
        return holder

    def announcements(self, call: Sequence[int]) -> dict[int, bytes | str]:
        """The `announcement` of each event of one script call that changes its person's list (not a hover,
        nor an event without personalisation consent): on a person's first such event the change of
        their last one in the call, on the others `1`. The script announces the change once any of
        them applied. One change a person, not one an event: a session's events come in runs, and each
        change is ~90 bytes to make, send and read (both sides ~4 % of their CPU an event in a row)."""
        persons = self.persons
        marked = [j for j in call if self.personal[j] and self.types[j] not in ATTENTION_EVENTS]
        last = {persons[j]: j for j in marked}
        first = {persons[j]: j for j in reversed(marked)}
        announcements: dict[int, bytes | str] = dict.fromkeys(marked, "1")
        for person, j in first.items():
            end = last[person]
            announcements[j] = change_json(person, self.sessions[end], self.types[end], self.batch[end].item_id)
        return announcements

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

    def _served_key(self, rec_request_id: str | None) -> str:
        return redis_keys.bandit_served(rec_request_id) if rec_request_id else ""

    def _seen_keys(self, person: str) -> tuple[str, str]:
        """The person's dedup markers and global plans."""
        found = self.seen_keys.get(person)
        if found is None:
            found = self.seen_keys[person] = (redis_keys.seen_events(person), redis_keys.global_plans(person))
        return found


def _global_ops(effects: EventGlobals, plan: str, speed: SpeedSettings) -> list[tuple[str, str, str, object]]:
    """(kind, key, member, value) of an event's global effects (apply_globals.lua's kinds), as
    apply_events.lua applies them on one Redis: its aggregates, the bandit's rewards (a click on the
    list it names, then the lists its plan claims after a '\1'), then what its plan (`+` and the
    session's earlier items, nearest first) adds: co-visits and the session-kNN index."""
    item, weight = effects.item, effects.weight
    entered, _, claims = plan.partition("\1")
    ops: list[tuple[str, str, str, object]] = []
    if item and weight > 0 and effects.trend_expireat > 0:
        ops += [
            ("zincr", effects.trend_key, item, repr(weight)),
            ("expireat", effects.trend_key, "", effects.trend_expireat),
            ("zincr", redis_keys.TRENDING_VERSIONS, effects.trend_key, 1),  # counted: speed_layer/trending.py
        ]
    if item and effects.popularity_expireat > 0:
        ops += [("zincr", effects.popularity_key, item, 1), ("expireat", effects.popularity_key, "", effects.popularity_expireat)]
    if item and effects.bestseller_increment > 0:
        ops += [
            ("zincr", effects.bestsellers_key, item, repr(effects.bestseller_increment)),
            ("trim", effects.bestsellers_key, "", speed.bestsellers_top_n),
        ]
    if effects.served:
        ops.append(("take", effects.served, effects.token, speed.session_ttl_s))
    for entry in filter(None, claims.split("\n")):
        # A list clicked on a device before its login was taken under the device's token (merge_identity.lua).
        served, _, taker = entry.partition("\t")
        ops.append(("claim", served, taker or effects.token, ""))
    if not entered.startswith("+"):
        return ops
    first, *others = entered.split("\0")
    # The session the event was first applied in: a delivery after the device's login is planned under
    # the user, whose token would name other keys (in another slot group, where the event has no marker).
    # A plan stored before the token was kept holds none.
    token = first[1:] or effects.token
    for gap, other in enumerate(others, start=1):
        covis = redis_keys.covisitation(other)
        ops += [("hincr", covis, item, follow_units(gap)), ("hcut", covis, "", speed.covis_top_n)]
    if speed.neighbour_sessions_per_item > 0:
        session_key, item_key = redis_keys.neighbour_session(token), redis_keys.item_sessions(item)
        ops += [
            ("zadd", session_key, item, effects.ts), ("zadd", item_key, token, effects.ts),
            ("keep", session_key, "", speed.recent_items), ("trim", item_key, "", speed.neighbour_sessions_per_item),
            ("expire", session_key, "", speed.neighbour_session_ttl_s), ("expire", item_key, "", speed.neighbour_session_ttl_s),
        ]  # fmt: skip
    return ops


def _group_calls(
    planned: Sequence[tuple[int, EventGlobals, str]], speed: SpeedSettings
) -> list[tuple[list[str], list[Any], list[int]]]:
    """One apply_globals.lua call per slot group the events touch: (KEYS, ARGV, the positions of its
    events in order)."""
    groups: dict[int, tuple[dict[str, int], dict[str, int], list[object], list[int]]] = {}
    taken: set[str] = set()
    for position, effects, plan in planned:
        if effects.event_id in taken:
            continue  # the same event twice in a batch: its first copy carries its effects
        taken.add(effects.event_id)
        for kind, key, member, value in _global_ops(effects, plan, speed):
            group = redis_keys.group_of_key(key)
            assert group is not None, f"{key!r} is in no slot group"
            key_index, events, ops, positions = groups.setdefault(group, ({}, {}, [], []))
            event = events.get(effects.event_id)
            if event is None:
                event = events[effects.event_id] = len(events) + 1
                positions.append(position)
            index = key_index.setdefault(key, len(key_index))
            ops += _GLOBAL_OP(event=event, kind=kind, key=index + 1, member=member, value=value)
    calls = []
    for group, (key_index, events, ops, positions) in sorted(groups.items()):
        keys = APPLY_GLOBALS.keys.pack(seen=redis_keys.group_seen(group), key=list(key_index))
        args = APPLY_GLOBALS.argv.pack(
            key_count=len(key_index), event_count=len(events), op_count=len(ops) // 5, dedup_ttl=speed.dedup_ttl_s,
            event_id=list(events), op=ops,
        )  # fmt: skip
        calls.append((keys, args, positions))
    return calls
