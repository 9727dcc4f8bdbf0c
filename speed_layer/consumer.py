"""The speed-layer consumer: reads the event stream in a consumer group and folds each event into Redis.

A batch is acknowledged only after its effects are written; entries a dead consumer left pending
are claimed after `claim_idle_ms`; malformed entries go to the dead-letter stream with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from common import redis_keys
from common.catalog import ItemUpdate
from common.catalog_state import read_contents
from common.content import ItemContent, content_of_row
from common.events import Event
from common.heap import collect_young_rarely, freeze_long_lived
from common.lake import Lake
from common.messages import ModelEvent, RecsChanged, RecsChangedBatch
from common.model import ModelArtifacts, load_model
from common.registry import Registry, RegistryError
from common.settings import Settings
from common.speed_state import trending_decay_weights
from common.stream import DEAD_LETTER_FIELD, decode_entry, remove_idle_consumers
from speed_layer import metrics
from speed_layer.bandit import ImpressionCounter
from speed_layer.effects import Applier, BatchResult, Started, StateRead
from speed_layer.migrations import run_migrations
from speed_layer.sender import lane_for
from speed_layer.switch import stamped, switch_version
from speed_layer.trending import TrendingSum

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]
CATALOG_CHANNEL = redis_keys.CATALOG_CHANNEL.encode()
Versions = list[bytes | None]  # the served and the pending version, as stored


def poll_until_stopped(poll_once: Callable[[], int], stop: threading.Event) -> None:
    """Call `poll_once` until `stop` is set; a lost Redis is waited out, not fatal."""
    while not stop.is_set():
        try:
            poll_once()
        except redis.ConnectionError as exc:
            log.warning("redis unavailable (%s); retrying in 1s", exc)
            stop.wait(1.0)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def ensure_group(client: redis.Redis, stream_key: str, group: str) -> None:
    """Create the consumer group at the stream's start (and the stream), once."""
    try:
        client.xgroup_create(stream_key, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


@dataclass
class _Batch:
    """Stream entries being applied: decoded events, entries to dead-letter, the applier's batch."""

    entries: Sequence[Entry]
    events: list[Event] = field(default_factory=list)
    event_ids: list[bytes] = field(default_factory=list)  # of the decoded events, in order
    dead: list[tuple[bytes, dict[bytes, bytes], str]] = field(default_factory=list)
    models: list[ModelArtifacts] = field(default_factory=list)
    state: StateRead | None = None  # its reads, sent ahead
    started: Started | None = None
    read_at: float = field(default_factory=time.perf_counter)  # made right after its entries were read


class SpeedConsumer:
    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        registry: Registry | None = None,
        lake: Lake | None = None,
        name: str | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.speed = settings.speed
        self.registry = registry or Registry(settings.models.root)
        self.lake = lake or Lake(settings.lake.root)
        self.name = name or consumer_name()
        self.stream_key = redis_keys.stream(settings.redis.stream)
        self.dead_key = redis_keys.dead_letter(settings.redis.stream)
        self.applier = Applier(client, settings, seed=os.getpid())
        self.acks = lane_for(client)  # acknowledgements, read back at the next batch
        self.reads = lane_for(client)  # the next batch's XREADGROUP, sent while this one runs
        self.models: dict[str, ModelArtifacts] = {}
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(redis_keys.MODELS_CHANNEL, redis_keys.CATALOG_CHANNEL)
        self._next_claim = 0.0
        self._next_registry_check = 0.0
        self._next_trending = 0.0
        self._trending_pause_s = self.speed.trending_refresh_s  # until the next re-sum (refresh_trending)
        self._trending = TrendingSum()  # the buckets as this consumer last read them
        self._next_impressions = 0.0
        # After a restart under the same name: where to read on our unacked entries from; None once all read.
        self._own_pending_after: str | bytes | None = "0"
        self._announced: list[str] = []
        self._prepared: _Batch | None = None  # decoded, its reads sent, not started yet (pump)
        self._in_flight: _Batch | None = None  # started, not yet finished (pump)
        self.stream_gauges = metrics.StreamGauges(client, settings.redis.stream, settings.metrics.stream_refresh_s)
        self.content_vectors = settings.models.content_vectors
        # Catalog items (the lake's newest snapshot, then live updates): a loaded version gives those it
        # has no batch vector for their content vectors.
        self._contents: dict[str, ItemContent] = self._catalog_contents() if self.content_vectors else {}
        ensure_group(client, self.stream_key, self.speed.group)
        self.impressions = ImpressionCounter(client, settings, self.name)
        for lane in (self.applier.lane, self.acks, self.reads):
            lane.open()

    # ------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        log.info("speed consumer %s reading %s as group %s", self.name, self.stream_key, self.speed.group)
        self.warm_up()
        try:
            poll_until_stopped(self.pump, stop)
        finally:
            try:  # what was read is applied and acknowledged before exit
                self._drain()
                if self.reads.unread:
                    entries, versions = self._take_entries()
                    if entries:
                        self._finish(self._start(entries, versions))
                self._settle_acks()
            except redis.ConnectionError:
                pass  # left pending: another consumer claims it, dedup skips what was applied

    def warm_up(self) -> None:
        """Convert what an earlier version left (speed_layer/migrations.py), load the served versions now,
        so the first batch does not wait for them (~0.1 s), then freeze the heap: what is alive now
        (modules, the model's id maps) lives as long as the process, and full garbage collections that
        walk it cost more than the batches they pause. Young collections then wait for 50,000 new
        objects, not 700, so they no longer walk the batch in hand (common/heap.py)."""
        try:
            run_migrations(self.client, self.speed.covis_top_n, self.speed.recent_items)
            self._active_models()
        except redis.ConnectionError:
            pass  # the loop waits Redis out (the migrations run at the next start)
        freeze_long_lived()
        collect_young_rarely()

    def poll_once(self, block: bool = True) -> int:
        """Housekeeping, then one batch from read to acknowledgement; returns how many entries it handled."""
        self._drain()
        self._housekeeping()
        self.stream_gauges.refresh_if_due()
        entries, versions = self._read(block)
        if entries:
            self._finish(self._start(entries, versions))
        self._settle_acks()
        return len(entries)

    def pump(self, block: bool = True) -> int:
        """One step of the overlapped loop, whenever entries came: read batch n+1 and send its reads,
        start batch n (whose reads were sent one step ago, ahead of the scripts now running), then
        finish batch n-1, whose scripts Redis ran meanwhile. A read that finds nothing new while two
        batches are under way starts the prepared one, finishes the one before it and reads once more
        (`_read_after_advancing`); when that too finds nothing, everything is finished, so an event
        that arrives alone waits for no other.

        Overlapping only full batches left a steady stream of small ones (each tick of the sender)
        applied one at a time, Python and Redis taking turns: at 5,000 events/s the consumer fell
        behind until its batches filled (freshness p99 0.26 and 0.52 s in two runs, 0.08 and 0.18 s
        overlapped).
        Returns how many entries it read; after a 0 nothing is in flight, acknowledgements included."""
        try:
            if (self._prepared is None and self._in_flight is None) or self._housekeeping_due():
                self._drain()  # a version switch replays through the same lanes
                self._housekeeping()
            self.stream_gauges.refresh_if_due()
            idle = self._prepared is None and self._in_flight is None
            entries, versions = self._read(block and idle)
            if not entries and self._prepared is not None and self._in_flight is not None:
                entries, versions = self._read_after_advancing()
            upcoming = self._prepare(entries, versions) if entries else None
            if entries:
                self._prefetch()
            self._advance()
            self._prepared = upcoming
            if not entries:
                self._drain()
        except BaseException:
            # Whatever was read stays unacknowledged: claimed later, and dedup skips what applied.
            self._prepared = self._in_flight = None
            self.applier.reset()
            self.acks.reset()
            self.reads.reset()
            raise
        return len(entries)

    def _advance(self) -> None:
        """Start the prepared batch, then finish the one before it."""
        if self._prepared is None:
            return
        self._launch(self._prepared)
        self._finish_in_flight()
        self._in_flight, self._prepared = self._prepared, None

    def _read_after_advancing(self) -> tuple[list[Entry], Versions | None]:
        """Nothing came since the last read, with two batches under way: advance the loop one step (start
        the prepared one, wait for the other's effects), then read again. At a high rate entries arrive
        meanwhile and the loop goes on overlapped, where finishing everything at once had the consumer
        and Redis take turns at each lull between two of the sender's ticks (freshness at 10,000
        events/s offered: p99 ~85 -> ~40 ms). With one batch under way, as an event that arrives alone
        is, nothing would have come: the loop drains at once, without this read."""
        self._advance()
        return self._read(block=False)

    def _drain(self) -> None:
        """Start the prepared batch and finish everything, acknowledgements included."""
        self._advance()
        self._finish_in_flight()
        self._settle_acks()

    def _read(self, block: bool) -> tuple[list[Entry], Versions | None]:
        """The next entries, and the served versions when they were read right after them."""
        prefetched = self.reads.unread > 0
        if prefetched:
            entries, versions = self._take_entries()
            if entries:
                return entries, versions
        if self._own_pending_after is not None:  # our unacked entries first
            # On from the last one read: from "0" again, the entries of batches in flight would come back.
            entries, versions = self._xreadgroup(self._own_pending_after, block=False)
            if entries:
                self._own_pending_after = entries[-1][0]
                return entries, versions
            self._own_pending_after = None
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.speed.claim_interval_s
            claimed = self.claim_idle()
            self.remove_dead_members()
            if claimed:
                return claimed, None
        if prefetched and not block:
            # Asked a step ago and nothing had come: the loop drains now, and its next read blocks (returning
            # at once what came meanwhile), so a second read here is a round trip the lull does not need.
            return [], None
        return self._xreadgroup(">", block=block)

    def _xreadgroup(self, start: str | bytes, block: bool) -> tuple[list[Entry], Versions]:
        """Entries, and the versions to apply them to, read after them in the same round trip."""
        self._request_entries(start, block)
        return self._take_entries()

    def _prefetch(self) -> None:
        """Ask for the next entries before the next batch's scripts are written: Redis answers at once,
        and the answer waits in the socket until the consumer wants it. Not before our own pending
        entries are all read: new ones delivered meanwhile would be pending too, and read again."""
        if self._own_pending_after is None:
            self._request_entries(">", block=False)

    def _request_entries(self, start: str | bytes, block: bool) -> None:
        """XREADGROUP and the served versions after it, on the reads lane (replies: `_take_entries`)."""
        speed = self.speed
        blocking = ("BLOCK", speed.block_ms) if block else ()
        self.reads.send_all((
            ("XREADGROUP", "GROUP", speed.group, self.name, "COUNT", speed.batch_size, *blocking,
             "STREAMS", self.stream_key, start),
            ("MGET", redis_keys.SPEED_VERSION, redis_keys.SPEED_PENDING_VERSION),
        ))  # fmt: skip

    def _take_entries(self) -> tuple[list[Entry], Versions]:
        reply, versions = self.reads.read(2)
        for part in (reply, versions):
            if isinstance(part, Exception):
                raise part
        return _stream_entries(reply), versions

    def claim_idle(self) -> list[Entry]:
        """Take over entries another consumer left unacknowledged for longer than claim_idle_ms."""
        reply = self.client.xautoclaim(
            self.stream_key, self.speed.group, self.name,
            min_idle_time=self.speed.claim_idle_ms, start_id="0-0", count=self.speed.batch_size,
        )  # fmt: skip
        entries = [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
        if entries:
            log.info("claimed %d idle entries", len(entries))
        return entries

    def remove_dead_members(self) -> list[str]:
        """Remove members idle past dead_consumer_idle_ms with nothing pending (dead processes whose
        entries were claimed), and their heartbeats; returns their names."""
        removed = remove_idle_consumers(
            self.client, self.stream_key, self.speed.group, self.speed.dead_consumer_idle_ms, self.name
        )
        if removed:
            self.client.hdel(redis_keys.SPEED_HEARTBEAT, *removed)
            log.info("removed dead consumers from the group: %s", ", ".join(removed))
        return removed

    # ------------------------------------------------------------ one batch

    def process(self, entries: Sequence[Entry]) -> BatchResult:
        """Apply a batch; ack what is applied (or dead-lettered), leave the rest pending for a retry."""
        self._drain()
        result = self._finish(self._start(entries))
        self._settle_acks()
        return result

    def _start(self, entries: Sequence[Entry], versions: Versions | None = None) -> _Batch:
        return self._launch(self._prepare(entries, versions))

    def _prepare(self, entries: Sequence[Entry], versions: Versions | None = None) -> _Batch:
        """Decode the entries and send the reads they will be planned on. The versions they apply
        to are read after the entries (see speed_layer/switch.py)."""
        batch = _Batch(entries)
        for entry_id, fields in entries:
            try:
                batch.events.append(stamped(decode_entry(fields), entry_id))
                batch.event_ids.append(entry_id)
            except ValueError as exc:
                batch.dead.append((entry_id, fields, str(exc)))
        batch.models = self._active_models(versions)
        batch.state = self.applier.read_state(batch.events, batch.models)
        return batch

    def _launch(self, batch: _Batch) -> _Batch:
        """Plan the batch and write its script calls."""
        batch.started = self.applier.start(batch.events, batch.models, state=batch.state)
        return batch

    def _finish_in_flight(self) -> None:
        batch, self._in_flight = self._in_flight, None
        if batch is not None:
            self._finish(batch)

    def _finish(self, batch: _Batch) -> BatchResult:
        """Wait for the batch's effects, then acknowledge, dead-letter and announce what an identify's merge
        changed (the effects script announces the events it applies as it writes them).

        Those writes go down their own lane and their replies are read at the next batch: the
        effects are written, so a lost acknowledgement only means a redelivery, which dedup skips."""
        assert batch.started is not None
        result = self.applier.finish(batch.started)
        event_ids, fields_of = batch.event_ids, dict(batch.entries)
        dead = batch.dead + [
            (event_ids[i], fields_of[event_ids[i]], reason) for i, reason in result.failed.items()
        ]
        unresolved = {event_ids[i] for i in result.unresolved}
        _observe(batch, result, len(dead))
        acked = [entry_id for entry_id, _ in batch.entries if entry_id not in unresolved]

        self._settle_acks()
        calls: list[tuple[Any, ...]] = []
        for entry_id, fields, reason in dead:
            letter = _dead_letter_fields(entry_id, fields, reason, self.speed.group)
            calls.append(("XADD", self.dead_key, "*", *_flat(letter)))
        if acked:
            calls.append(("XACK", self.stream_key, self.speed.group, *acked))
        if result.changed:
            calls.append(("PUBLISH", redis_keys.RECS_CHANNEL, _announcement(result.changed)))
        calls.append(("HSET", redis_keys.SPEED_HEARTBEAT, self.name, int(time.time() * 1000)))
        self.acks.send_all(calls)  # one write
        if dead:
            log.warning("dead-lettered %d entries, first: %s", len(dead), dead[0][2])
        return result

    def _settle_acks(self) -> None:
        """Read the replies of the acknowledgements sent; a failed one leaves its entries pending."""
        for reply in self.acks.read(self.acks.unread):
            if isinstance(reply, Exception):
                log.error("acknowledging or dead-lettering failed: %s", reply)

    # ------------------------------------------------------------ model versions

    def _active_models(self, versions: Versions | None = None) -> list[ModelArtifacts]:
        """The current and the pending version's models (whose deltas this batch writes)."""
        if versions is None:
            versions = cast(Versions, self.client.mget([redis_keys.SPEED_VERSION, redis_keys.SPEED_PENDING_VERSION]))
        out: list[ModelArtifacts] = []
        for raw in versions:
            if raw is None:
                continue
            model = self._model(raw.decode())
            if model is not None and all(m.version != model.version for m in out):
                out.append(model)
        return out

    def _model(self, version: str) -> ModelArtifacts | None:
        if version not in self.models:
            try:
                model = load_model(self.registry, version, request_parts=False)
            except RegistryError as exc:
                log.error("cannot load model %s: %s", version, exc)
                return None
            self.models[version] = model.with_content_vectors(self._contents) if self.content_vectors else model
            for old in [v for v in self.models if v != version][:-1]:
                del self.models[old]  # keep at most two versions in memory
        return self.models[version]

    def _catalog_contents(self) -> dict[str, ItemContent]:
        try:
            table = self.lake.read_catalog()
        except Exception:  # the speed layer runs on without; live catalog updates still add items
            log.exception("cannot read the catalog from the lake")
            return {}
        return {row["item_id"]: content_of_row(row) for row in table.to_pylist()}

    def _housekeeping_due(self) -> bool:
        self._announced += self._announced_versions()
        now = time.monotonic()
        return bool(self._announced) or now >= min(self._next_registry_check, self._next_trending, self._next_impressions)

    def _housekeeping(self) -> None:
        """Version switches, the trending re-sum and the bandit's impressions; run with no batch in flight."""
        announced, self._announced = self._announced + self._announced_versions(), []
        for version in announced:
            self.switch_to(version)
        now = time.monotonic()
        if now >= self._next_registry_check:  # covers a missed pub/sub message and the first start
            self._next_registry_check = now + self.speed.claim_interval_s
            current = self._registry_current()
            if current is not None:
                self.switch_to(current)
        if now >= self._next_trending:
            self.refresh_trending()
            self._next_trending = now + self._trending_pause_s
        if now >= self._next_impressions:
            self._next_impressions = now + self.settings.experiments.count_interval_s
            self.impressions.count()

    def _announced_versions(self) -> list[str]:
        """Model versions announced since the last look; forgets the categories of moved items."""
        versions: list[str] = []
        updates: list[ItemUpdate] = []
        while (message := self.pubsub.get_message(timeout=0)) is not None:
            try:
                if message["channel"] == CATALOG_CHANNEL:
                    updates.append(ItemUpdate.model_validate_json(message["data"]))
                else:
                    versions.append(ModelEvent.model_validate_json(message["data"]).version)
            except ValueError as exc:
                log.warning("ignoring a malformed message on %s: %s", message["channel"], exc)
        if updates:  # one message an item: a burst in one read of their contents and one copy of the factors
            self.apply_catalog(updates)
        return versions

    def apply_catalog(self, updates: Sequence[ItemUpdate]) -> None:
        """Item updates: forget the categories of moved items; give items whose content changed their
        content vector from the live state (which the update was written to before it was announced)."""
        for update in updates:
            if update.category_path:
                self.applier.categories.forget(update.item_id)
        changed = [u.item_id for u in updates if u.changes_content]
        if self.content_vectors and changed:
            self.add_contents(read_contents(self.client, changed))

    def add_contents(self, contents: Mapping[str, ItemContent]) -> None:
        """Items' content (new or changed): the loaded versions give those they have no batch vector for
        their content vectors."""
        if not self.content_vectors:
            return
        self._contents.update(contents)
        self.models = {version: model.with_content_vectors(contents) for version, model in self.models.items()}

    def _registry_current(self) -> str | None:
        try:
            return self.registry.current()
        except OSError as exc:
            log.warning("cannot read the registry: %s", exc)
            return None

    def switch_to(self, version: str) -> bool:
        """Rebuild and switch to `version` unless the speed layer serves it already or another consumer does it."""
        served = cast(bytes | None, self.client.get(redis_keys.SPEED_VERSION))
        if served is not None and served.decode() == version:
            return False
        model = self._model(version)
        if model is None:
            return False
        return switch_version(self.client, self.settings, self.lake, self.applier, model)

    # ------------------------------------------------------------ trending

    def refresh_trending(self, now_s: float | None = None) -> bool:
        """Re-sum the window's buckets into TRENDING_TOP (one consumer at a time), then hold the lock
        for `trending_pause_s` of what the re-sum took (so do the other consumers)."""
        speed = self.speed
        lock_ms = max(1, int(speed.trending_refresh_s * 1000 * 0.9))
        if not self.client.set(redis_keys.TRENDING_REFRESH_LOCK, self.name, nx=True, px=lock_ms):
            return False
        started = time.monotonic()
        weights = trending_decay_weights(
            time.time() if now_s is None else now_s, speed.trending_bucket_s, speed.trending_window_s,
            speed.trending_half_life_s,
        )  # fmt: skip
        buckets = {redis_keys.trending_bucket(start): w for start, w in weights.items()}
        refreshed = self._trending.refresh(self.client, buckets, speed.trending_top_n)
        # A consumer's first re-sum reads every bucket once: the next ones read what changed.
        spent_s = time.monotonic() - started - refreshed.first_reads_s
        self._trending_pause_s = trending_pause_s(spent_s, speed.trending_refresh_s)
        # Set again, not extended: a re-sum longer than the lock's first term outlives it.
        self.client.set(redis_keys.TRENDING_REFRESH_LOCK, self.name, px=max(1, int(self._trending_pause_s * 1000 * 0.9)))
        return True


# A re-sum reads the buckets that changed (speed_layer/trending.py): ~10-20 ms of a consumer's time with
# 2,000-5,000 items a bucket, Redis held ~1-2 ms at a time (2026-12-06). A store with far larger
# buckets would spend more: the re-sums are spaced to at most this share of the time.
TRENDING_BUSY_SHARE = 0.005


def trending_pause_s(resum_s: float, refresh_s: float) -> float:
    """Seconds until the next re-sum of trending after one that took `resum_s`: `refresh_s` at least."""
    return max(refresh_s, resum_s / TRENDING_BUSY_SHARE)


def _observe(batch: _Batch, result: BatchResult, dead: int) -> None:
    """The batch's metrics, once its effects are written: outcomes, latency, each handled event's freshness."""
    metrics.BATCH_SECONDS.observe(time.perf_counter() - batch.read_at)
    metrics.count_batch(result.applied, result.duplicates, result.erased, dead, len(result.unresolved))
    left = result.failed.keys() | set(result.unresolved)
    metrics.observe_freshness([e for i, e in enumerate(batch.events) if i not in left] if left else batch.events)


def _announcement(changed: Mapping[str, tuple[str | None, Event]]) -> str:
    """One RecsChangedBatch for the people the batch's identifies merged, with the last event of each."""
    changes = [
        RecsChanged(person_id=person, session_id=session, event_type=event.event_type.value, item_id=event.item_id)
        for person, (session, event) in changed.items()
    ]
    return RecsChangedBatch(changes=changes).model_dump_json()


def _stream_entries(reply: Any) -> list[Entry]:
    """The entries of a raw one-stream XREADGROUP reply (RESP2 list or RESP3 map; None when empty)."""
    if not reply:
        return []
    _, entries = next(iter(reply.items())) if isinstance(reply, dict) else reply[0]
    out = []
    for entry_id, fields in entries:
        if fields is None:  # deleted from the stream since it was delivered
            continue
        if not isinstance(fields, dict):  # a flat [field, value, ...] list
            fields = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append((entry_id, fields))
    return out


def _flat(fields: dict[Any, Any]) -> list[Any]:
    return [part for pair in fields.items() for part in pair]


def _dead_letter_fields(
    entry_id: bytes, fields: dict[bytes, bytes], reason: str, group: str
) -> dict[Any, Any]:
    raw = fields.get(b"e")
    if raw is None:  # keep whatever the entry held, readable
        raw = json.dumps(
            {k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()}
        ).encode()
    return {
        "entry_id": entry_id,
        "group": group,
        "reason": reason[:2000],
        DEAD_LETTER_FIELD: raw,
        "at_ms": int(time.time() * 1000),
    }
