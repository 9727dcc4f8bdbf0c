"""Process-wide serving state, built once in the app's lifespan: model, catalog, rules, Redis, impressions.

Also runs the listener that hot-reloads the model when the registry publishes a ModelEvent
on Redis pub/sub, and keeps the erased users, who look new to a version trained before their erasure.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from common import redis_keys
from common.catalog import ItemUpdate
from common.heap import freeze_long_lived
from common.lake import Lake
from common.messages import ModelEvent
from common.redis_server import connect, pubsub_url
from common.registry import Registry
from common.settings import Settings
from common.speed_state import ItemFlagsCopy, TrendingCopy
from serving.core.catalog_view import CatalogView
from serving.core.day_counts import DayCounts
from serving.core.drift import DriftProbe
from serving.core.erasure import ErasedPeople
from serving.core.experiments import Bandit
from serving.core.impressions import ImpressionLogger
from serving.core.model_holder import ModelHolder, lake_popular
from serving.core.rules import Rules, load_rules

log = logging.getLogger(__name__)

# After a Redis error, requests skip Redis for this long instead of each paying a timeout.
REDIS_RETRY_AFTER_S = 1.0
ERASURES_REFRESH_S = 10.0
DAY_COUNTS_CHECK_S = 15.0  # how often a worker looks for a stale or new past day (each reloads every 5 min)


def single_threaded_blas() -> None:
    """One BLAS thread per serving process (a worker, a push helper), as `recs serve` sets by environment,
    also under a bare uvicorn."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: installed with scipy's stack; the env vars cover `recs serve`
        return
    threadpool_limits(1)


@dataclass
class RedisGate:
    """A Redis client with a short circuit breaker: one failure marks it down for a second."""

    client: redis.Redis
    down_until: float = 0.0
    last_error: str | None = None

    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, exc: Exception) -> None:
        self.down_until = time.monotonic() + REDIS_RETRY_AFTER_S
        self.last_error = f"{exc.__class__.__name__}: {exc}"

    def succeeded(self) -> None:
        self.down_until = 0.0
        self.last_error = None


@dataclass
class ServingState:
    settings: Settings
    lake: Lake
    registry: Registry
    rules: Rules
    catalog: CatalogView
    models: ModelHolder
    redis: RedisGate
    impressions: ImpressionLogger
    lake_popular: list[tuple[str, float]] = field(default_factory=list)
    erased: ErasedPeople = field(default_factory=ErasedPeople)
    stream_lag: StreamLagProbe = field(default_factory=lambda: StreamLagProbe())
    stream_trim: StreamTrimSchedule = field(default_factory=lambda: StreamTrimSchedule())
    drift: DriftProbe = field(default_factory=DriftProbe)
    day_counts: DayCounts = field(default_factory=DayCounts)
    item_flags: ItemFlagsCopy = field(default_factory=ItemFlagsCopy)  # the live out-of-stock and promoted sets
    trending: TrendingCopy = field(default_factory=TrendingCopy)  # the live trending list
    bandit: Bandit | None = None  # set from the settings in bandit mode
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        experiments = self.settings.experiments
        if self.bandit is None and experiments.mode == "bandit":
            self.bandit = Bandit(experiments, self.settings.speed.session_ttl_s)

    @classmethod
    def start(cls, settings: Settings) -> ServingState:
        lake = Lake(settings.lake.root)
        registry = Registry(settings.models.root)
        catalog = CatalogView.from_lake(lake)
        state = cls(
            settings=settings,
            lake=lake,
            registry=registry,
            rules=load_rules(settings.api.rules_file),
            catalog=catalog,
            models=ModelHolder(
                registry, catalog, settings.var_dir / "compiled-rankers", settings.models.content_vectors
            ),
            redis=RedisGate(connect(settings.redis.effective_url, settings.redis.socket_timeout_s)),
            impressions=ImpressionLogger(lake, flush_seconds=settings.api.impressions_flush_s),
            day_counts=DayCounts(today_refresh_s=settings.api.today_counts_refresh_s),
        )
        state.models.reload()
        if state.models.current is None:
            state.lake_popular = lake_popular(lake)
        state._refresh_erasures()
        state._refresh_day_counts()  # before the first request: past days then never cost a request
        freeze_long_lived()  # the model and catalog just loaded: no full collection walks them per request
        state._spawn(state._listen_for_models, "model-listener")
        state._spawn(state._erasures_loop, "erasures-refresh")
        state._spawn(state._day_counts_loop, "day-counts-refresh")
        if state.day_counts.today_refresh_s > 0:
            state._spawn(state._today_counts_loop, "today-counts-refresh")
        return state

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.impressions.close()
        self.redis.client.close()

    def reload_model(self, version: str | None = None) -> None:
        """Reload (rules too, so a rules edit ships with an activation); refresh the no-model fallback."""
        try:
            self.rules = load_rules(self.settings.api.rules_file)
        except (OSError, ValueError):
            log.exception("keeping the previous rules: %s is invalid", self.settings.api.rules_file)
        before = self.models.current
        self.models.reload(version)
        if self.models.current is None:
            self.lake_popular = lake_popular(self.lake)
        if self.models.current is not before:
            freeze_long_lived()  # one full collection per model swap, not one every few thousand requests

    def apply_catalog(self, updates: list[ItemUpdate]) -> None:
        """Item updates into this worker's catalog, and content vectors for the items whose content changed."""
        self.catalog.apply(updates)
        self.models.add_content_vectors([u.item_id for u in updates if u.changes_content])

    # ------------------------------------------------------------ background threads

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _listen_for_models(self) -> None:
        """Subscribe to the models and catalog channels; reconnect (and catch up with CURRENT) after Redis outages."""
        url = self.settings.redis.effective_url
        while not self._stop.is_set():
            client = redis.Redis.from_url(pubsub_url(url), socket_connect_timeout=0.5, socket_timeout=5)
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(redis_keys.MODELS_CHANNEL, redis_keys.CATALOG_CHANNEL)
                self.reload_model()  # a message may have been missed while disconnected
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    # A catalog update is one message an item: a burst of them (a stock feed) is applied as one.
                    burst: list[bytes] = []
                    while message is not None and message["channel"].decode() == redis_keys.CATALOG_CHANNEL:
                        burst.append(message["data"])
                        message = pubsub.get_message(timeout=0.0)
                    if burst:
                        self._on_catalog_messages(burst)
                    if message is not None:
                        self._on_model_message(message["data"])
            except redis.RedisError:
                self._stop.wait(1.0)
            finally:
                client.close()

    def _on_model_message(self, data: bytes) -> None:
        try:
            event = ModelEvent.model_validate_json(data)
        except ValueError:
            log.warning("ignoring a malformed message on %s", redis_keys.MODELS_CHANNEL)
            return
        self.reload_model(event.version)

    def _on_catalog_messages(self, messages: list[bytes]) -> None:
        """Another worker applied item updates: mirror titles, prices and categories here too."""
        updates = []
        for data in messages:
            try:
                updates.append(ItemUpdate.model_validate_json(data))
            except ValueError:
                log.warning("ignoring a malformed message on %s", redis_keys.CATALOG_CHANNEL)
        if updates:
            self.apply_catalog(updates)

    def _day_counts_loop(self) -> None:
        while not self._stop.wait(DAY_COUNTS_CHECK_S):
            self._refresh_day_counts()

    def _refresh_day_counts(self) -> None:
        try:
            self.day_counts.refresh(self.redis.client)
        except redis.RedisError as exc:  # requests read past days live meanwhile
            log.info("could not refresh the past days' counts: %s", exc)

    def _today_counts_loop(self) -> None:
        while not self._stop.wait(self.day_counts.today_refresh_s):
            try:
                self.day_counts.refresh_today(self.redis.client)
            except redis.RedisError as exc:  # the copy ages out; requests read today live meanwhile
                log.info("could not refresh today's counts: %s", exc)

    def _erasures_loop(self) -> None:
        while not self._stop.wait(ERASURES_REFRESH_S):
            self._refresh_erasures()

    def _refresh_erasures(self) -> None:
        """Erased users, queued or applied: their batch vector is ignored until a version trained after
        their erasure serves."""
        try:
            self.erased.merge(self.lake.erasure_times())
        except Exception:
            log.exception("could not read the erasure queue")


class StreamTrimSchedule:
    """When a worker's POST /v1/events also trims the stream: at most once a second. The trim script
    reads every consumer group's position, and Redis spent ~5x an XADD's time on it; the retention is
    hours, so a trim a second late keeps nothing that matters."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next = -1e9

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True


class StreamLagProbe:
    """The speed layer's consumer-group lag, read at most once a second per worker."""

    def __init__(self, ttl_s: float = 1.0) -> None:
        self.ttl_s = ttl_s
        self._value = 0
        self._read_at = -1e9

    def read(self, state: ServingState) -> int:
        from common.stream import group_lag
        from serving.core import metrics

        now = time.monotonic()
        if now - self._read_at >= self.ttl_s:
            self._value = group_lag(
                state.redis.client, state.settings.redis.stream, state.settings.speed.group
            )
            self._read_at = now
            metrics.STREAM_LAG.set(self._value)
        return self._value
