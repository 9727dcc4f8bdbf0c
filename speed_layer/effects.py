"""Apply a batch of events to Redis: plan each event's effects in Python, run them as pipelined Lua calls.

Python computes what needs the model (SGD deltas) and what needs lookups (categories, aliases,
the session's other items); the Lua script applies it with the dedup marker in one atomic step.
The same applier serves the live consumers (version-free effects plus the deltas of the current
and pending versions) and the version-switch replay (one version's deltas only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis

from common import redis_keys
from common.catalog_state import item_categories
from common.events import Event, EventType
from common.features import DAY_S, POP_DAYS, day_index, implicit_weight
from common.model import ModelArtifacts
from common.settings import Settings
from common.speed_state import forward_decay
from common.vectors import sgd_step
from speed_layer.scripts import APPLY_EVENT, MERGE_IDENTITY

log = logging.getLogger(__name__)

NO_SESSION = "_"  # session id of events sent without one
COVIS_WINDOW = 5  # co-visit pairs are formed with the 5 latest session items: bounds the script's work
BESTSELLER_EVENTS = {EventType.PURCHASE: True, EventType.ADD_TO_CART: True}


@dataclass
class BatchResult:
    applied: int = 0  # events whose version-free effects or a delta were written now
    duplicates: int = 0  # events whose effects were all there already
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason (script errors)
    unresolved: list[int] = field(default_factory=list)  # still conflicting after the retries
    changed: dict[str, tuple[str | None, Event]] = field(
        default_factory=dict
    )  # person -> (session, last event)


class CategoryCache:
    """item -> category, from the live item state; refilled for misses in one pipeline per batch."""

    def __init__(self, client: redis.Redis, max_size: int = 500_000) -> None:
        self.client = client
        self.max_size = max_size
        self.known: dict[str, str] = {}

    def lookup(self, items: set[str]) -> dict[str, str]:
        missing = [i for i in items if i not in self.known]
        if missing:
            if len(self.known) > self.max_size:
                self.known.clear()  # bounded memory; categories rarely change, so a refill is cheap
            found = item_categories(self.client, missing)
            for item in missing:
                self.known[item] = found.get(item, "")
        return {i: self.known[i] for i in items}


def person_of(event: Event, aliases: dict[str, str]) -> str:
    """The identity an event's state is kept under: the user, else the device's alias, else the device."""
    return event.user_id or aliases.get(event.anonymous_id) or event.anonymous_id


def received_s(event: Event) -> float:
    assert event.received_at is not None  # consumers stamp it from the entry id when missing
    return event.received_at.timestamp()


class Applier:
    """Applies events' effects exactly once; see APPLY_EVENT for the atomic part."""

    def __init__(self, client: redis.Redis, settings: Settings, seed: int = 0) -> None:
        self.client = client
        self.settings = settings
        self.speed = settings.speed
        self.categories = CategoryCache(client)
        self.rng = np.random.default_rng(seed)
        self.apply_script = client.register_script(APPLY_EVENT)
        self.merge_script = client.register_script(MERGE_IDENTITY)

    # ------------------------------------------------------------ batches

    def apply(
        self,
        events: Sequence[Event],
        models: Sequence[ModelArtifacts],
        base: bool = True,
        now_s: float | None = None,
    ) -> BatchResult:
        """Apply events in order; `models` are the versions whose deltas to update (at most two)."""
        result = BatchResult()
        start = 0
        for i, event in enumerate(events):
            if event.event_type is EventType.IDENTIFY and base:
                self._apply_plain(events, range(start, i), models, base, now_s, result)
                self._identify(i, event, result)
                start = i + 1
        self._apply_plain(events, range(start, len(events)), models, base, now_s, result)
        return result

    def _apply_plain(
        self,
        events: Sequence[Event],
        indices: range,
        models: Sequence[ModelArtifacts],
        base: bool,
        now_s: float | None,
        result: BatchResult,
    ) -> None:
        todo = list(indices)
        for _ in range(self.speed.conflict_retries):
            if not todo:
                return
            todo = self._attempt(events, todo, models, base, now_s, result)
        result.unresolved.extend(todo)

    def _attempt(
        self,
        events: Sequence[Event],
        todo: list[int],
        models: Sequence[ModelArtifacts],
        base: bool,
        now_s: float | None,
        result: BatchResult,
    ) -> list[int]:
        """One pipelined pass; returns the indices to retry because a delta moved underneath."""
        now = time.time() if now_s is None else now_s
        batch = [events[i] for i in todo]
        aliases = self._aliases(batch)
        persons = [person_of(e, aliases) for e in batch]
        sessions = [e.session_id or NO_SESSION for e in batch]
        categories = self.categories.lookup({e.item_id for e in batch if e.item_id})
        deltas = self._read_deltas(batch, persons, models)
        recent = self._read_recent(persons, sessions) if base else {}

        pipe = self.client.pipeline(transaction=False)
        for event, person, session in zip(batch, persons, sessions, strict=True):
            keys, args = self._plan(event, person, session, categories, deltas, recent, models, base, now)
            self.apply_script(keys=keys, args=args, client=pipe)
        replies = pipe.execute(raise_on_error=False)

        retry = []
        for index, event, person, session, reply in zip(todo, batch, persons, sessions, replies, strict=True):
            if isinstance(reply, Exception):
                result.failed[index] = f"effects failed: {reply}"
            elif reply == -1:
                retry.append(index)
            elif reply == 0:
                result.duplicates += 1
            else:
                result.applied += 1
                result.changed[person] = (session, event)
        return retry

    # ------------------------------------------------------------ planning one event

    def _plan(
        self,
        event: Event,
        person: str,
        session: str,
        categories: dict[str, str],
        deltas: dict[tuple[str, str], tuple[np.ndarray, int]],
        recent: dict[tuple[str, str], list[str]],
        models: Sequence[ModelArtifacts],
        base: bool,
        now: float,
    ) -> tuple[list[str], list[object]]:
        speed = self.speed
        item = event.item_id or ""
        ts = event.ts.timestamp()
        weight = implicit_weight(event.event_type.value, event.dwell_ms, self.settings.training)
        category = categories.get(item, "") if item else ""
        quantity = event.quantity or 1

        version_args: list[object] = []
        version_keys: list[str] = []
        for slot in range(2):
            model = models[slot] if slot < len(models) else None
            planned = self._plan_delta(event, person, weight, model, deltas) if model else None
            if planned is None:
                version_args += ["", b"", 0]
                version_keys += [redis_keys.user_delta(person, "-"), redis_keys.user_event_count(person, "-")]
            else:
                assert model is not None
                delta, expected = planned
                version_args += [model.version, delta.astype("<f4").tobytes(), expected]
                version_keys += [
                    redis_keys.user_delta(person, model.version),
                    redis_keys.user_event_count(person, model.version),
                ]

        others: list[str] = []
        if base and item:
            seen_items = recent.setdefault((person, session), [])
            if item not in seen_items:
                others = seen_items[:COVIS_WINDOW]
                seen_items.insert(0, item)
                del seen_items[speed.recent_items :]

        bucket = int(ts // speed.trending_bucket_s) * speed.trending_bucket_s
        trend_expire = bucket + speed.trending_window_s + speed.trending_bucket_s
        day = day_index(ts)
        pop_expire = int((day + POP_DAYS + 1) * DAY_S)
        best = 0.0
        if category and event.event_type in BESTSELLER_EVENTS:
            best = weight * quantity * forward_decay(ts, speed.bestsellers_half_life_s)

        keys = [
            redis_keys.seen_event(person, event.event_id),
            redis_keys.session_recent(person, session),
            redis_keys.session_categories(person, session),
            redis_keys.session_cart(person, session),
            redis_keys.session_counts(person, session),
            redis_keys.person_sessions(person),
            redis_keys.person_items(person),
            redis_keys.person_purchases(person),
            redis_keys.trending_bucket(bucket),
            redis_keys.popularity_day(day),
            redis_keys.category_bestsellers(category or "-"),
            *version_keys,
            redis_keys.covisitation(item or "-"),
            *(redis_keys.covisitation(o) for o in others),
        ]
        args: list[object] = [
            "1" if base else "0",
            event.event_type.value,
            item,
            session,
            repr(ts),
            repr(weight),
            quantity,
            category,
            *version_args,
            speed.session_ttl_s,
            speed.recent_items,
            speed.dedup_ttl_s,
            speed.affinity_half_life_s,
            speed.history_ttl_s,
            speed.purchases_kept,
            trend_expire if trend_expire > now else 0,
            pop_expire if pop_expire > now else 0,
            repr(best),
            speed.bestsellers_top_n,
            speed.covis_top_n,
            speed.dedup_ttl_s,
            *others,
        ]
        return keys, args

    def _plan_delta(
        self,
        event: Event,
        person: str,
        weight: float,
        model: ModelArtifacts,
        deltas: dict[tuple[str, str], tuple[np.ndarray, int]],
    ) -> tuple[np.ndarray, int] | None:
        """The person's new delta for this version and the event count it must replace, or None."""
        if weight <= 0 or event.item_id is None or received_s(event) < model.cutoff_s:
            return None  # before the cutoff the batch vector already holds the event
        batch_vector = model.user_vector(person)
        item_index = model.item_index.get(event.item_id)
        if batch_vector is None or item_index is None:
            return None
        key = (person, model.version)
        delta, count = deltas.get(key) or (np.zeros(model.factors, dtype=np.float32), 0)
        speed = self.speed
        negatives = model.item_factors[self.rng.integers(0, len(model.item_ids), size=speed.negatives)]
        confidence = 1.0 + self.settings.training.alpha * weight
        updated = sgd_step(
            batch_vector, delta, model.item_factors[item_index], negatives,
            confidence, speed.learning_rate, speed.l2, speed.max_delta_norm,
        )  # fmt: skip
        deltas[key] = (updated, count + 1)  # later events of this person in the batch chain on it
        return updated, count

    # ------------------------------------------------------------ pre-reads (one pipeline each)

    def _aliases(self, batch: Sequence[Event]) -> dict[str, str]:
        devices = sorted({e.anonymous_id for e in batch if e.user_id is None})
        if not devices:
            return {}
        values = self.client.mget([redis_keys.alias(d) for d in devices])
        return {d: v.decode() for d, v in zip(devices, values, strict=True) if v}

    def _read_deltas(
        self, batch: Sequence[Event], persons: Sequence[str], models: Sequence[ModelArtifacts]
    ) -> dict[tuple[str, str], tuple[np.ndarray, int]]:
        wanted = sorted({(p, m.version) for p in persons for m in models if m.user_index.get(p) is not None})
        if not wanted:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for person, version in wanted:
            pipe.get(redis_keys.user_delta(person, version))
            pipe.get(redis_keys.user_event_count(person, version))
        replies = pipe.execute()
        by_version = {m.version: m for m in models}
        out = {}
        for j, (person, version) in enumerate(wanted):
            raw, count = replies[2 * j], replies[2 * j + 1]
            k = by_version[version].factors
            delta = np.frombuffer(raw, dtype="<f4").copy() if raw else np.zeros(k, dtype=np.float32)
            out[(person, version)] = (delta, int(count or 0))
        return out

    def _read_recent(
        self, persons: Sequence[str], sessions: Sequence[str]
    ) -> dict[tuple[str, str], list[str]]:
        pairs = sorted(set(zip(persons, sessions, strict=True)))
        pipe = self.client.pipeline(transaction=False)
        for person, session in pairs:
            pipe.zrevrange(redis_keys.session_recent(person, session), 0, self.speed.recent_items - 1)
        return {
            pair: [m.decode() for m in members] for pair, members in zip(pairs, pipe.execute(), strict=True)
        }

    # ------------------------------------------------------------ identify

    def _identify(self, index: int, event: Event, result: BatchResult) -> None:
        """Merge the device's sessions, items and purchases into the user's; alias the device."""
        user, device = event.user_id, event.anonymous_id
        assert user is not None  # the event schema requires it for identify
        if device == user:
            return
        sessions = [s.decode() for s in self.client.zrange(redis_keys.person_sessions(device), 0, -1)]
        keys = [
            redis_keys.seen_event(user, event.event_id),
            redis_keys.alias(device),
            redis_keys.person_sessions(device),
            redis_keys.person_sessions(user),
            redis_keys.person_items(device),
            redis_keys.person_items(user),
            redis_keys.person_purchases(device),
            redis_keys.person_purchases(user),
        ]
        for session in sessions:
            for person in (device, user):
                keys += [
                    redis_keys.session_recent(person, session),
                    redis_keys.session_categories(person, session),
                    redis_keys.session_cart(person, session),
                    redis_keys.session_counts(person, session),
                ]
        speed = self.speed
        try:
            merged = self.merge_script(
                keys=keys, args=[user, speed.history_ttl_s, speed.session_ttl_s, speed.dedup_ttl_s]
            )
        except redis.ResponseError as exc:
            result.failed[index] = f"identify merge failed: {exc}"
            return
        if merged:
            result.applied += 1
            result.changed[user] = (event.session_id, event)
        else:
            result.duplicates += 1
