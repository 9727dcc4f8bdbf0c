"""`recs evaluate replay`: train the batch layer before a test window, replay the window through the real
stream, speed layer and serving code, and score every served list against the session's next item.

Time: the speed layer keys trending and popularity counters by event time and lets Redis expire them
by the wall clock, so history cannot be replayed at its own dates. The whole replay (events, catalog
creation dates) is moved forward by a whole number of weeks to start just after now, which keeps
weekdays, times of day and every interval; serving is asked at each event's moved time.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common import events as event_contract
from common import redis_keys
from common.catalog import table_to_items
from common.catalog_state import load_items
from common.events import Event, table_to_events
from common.features import POP_DAYS
from common.lake import Lake
from common.model import load_model
from common.redis_server import (
    LocalRedisCluster,
    RedisServer,
    connect,
    free_cluster_port,
    free_port,
    is_cluster,
)
from common.registry import Registry
from common.settings import Settings
from common.stream import append_events
from evaluation.bandit import ReplayBandit
from evaluation.metrics import Scoreboard, popularity_percentiles
from evaluation.protocol import (
    PROTOCOL_COLUMNS,
    Protocol,
    TestSet,
    mark_new_items,
    sample_sessions,
    select_targets,
    target_prefixes,
    training_sessions,
)
from evaluation.references import REFERENCES
from evaluation.strategies import (
    BANDIT,
    BANDIT_ARMS,
    DEFAULT_STRATEGIES,
    SERVE_COST,
    STRATEGIES,
    STRATEGY_NAMES,
    Strategy,
    strategy_settings,
    write_plain_rules,
)
from serving.core.catalog_view import CatalogView, ItemInfo
from serving.core.impressions import ImpressionLogger
from serving.core.model_holder import ModelHolder
from serving.core.recommender import RecRequest, recommend
from serving.core.rules import load_rules
from serving.core.state import RedisGate, ServingState
from speed_layer.consumer import SpeedConsumer
from speed_layer.effects import Applier

log = logging.getLogger(__name__)

DAY_S = 86_400.0
WEEK_S = 7 * DAY_S
SPEED_DB, EMPTY_DB = 0, 1  # on one redis-server: the speed layer's state; an always-empty database for batch-only serving
REDIS_TIMEOUT_S = 30.0  # a loaded machine must slow the replay down, never degrade a served list
CONTEXT = "home"  # the list that follows the session (storefront shelf), not a product page


@dataclass(frozen=True)
class ReplayConfig:
    lake: str
    test_days: int = 7
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    engine: str = "implicit"
    seed: int = 42
    k: int = 20
    warmup_days: int = POP_DAYS  # fills the speed layer's trending and per-day popularity before the window
    max_sessions: int | None = None  # score a seeded sample of test sessions (every event is still replayed)
    chunk_span_s: float = 60.0  # events of other people within this much event time share a speed batch
    workers: int = 1  # processes; each replays the whole window for its share of the strategies
    redis_cluster: bool = False  # each window on a Redis Cluster of its own (3 masters, 3 replicas)
    protocol: Protocol = field(default_factory=Protocol)


def run_replay(
    config: ReplayConfig, settings: Settings, work_dir: Path, say: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Train, replay, score; returns the report (see README "Replay evaluation")."""
    clock = time.perf_counter()
    unknown = [s for s in config.strategies if s not in STRATEGY_NAMES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGY_NAMES)}")
    lake = Lake(config.lake)
    cutoff, end = test_window(lake, config.test_days)
    settings = _run_settings(settings, config, work_dir)

    say(f"training the batch layer ({config.engine}) on events before {cutoff:%Y-%m-%d}")
    train_clock = time.perf_counter()
    version = train(settings, cutoff, config.engine)
    train_s = time.perf_counter() - train_clock
    model = load_model(Registry(settings.models.root), version)

    events = protocol_events(lake, end)
    # Items new since the cutoff are targets too (counted apart: `new_item_*`): the catalog names them.
    known = set(model.item_ids) | set(lake.read_catalog()["item_id"].to_pylist())
    test = select_targets(events, cutoff.timestamp(), known, config.protocol)
    test = mark_new_items(sample_sessions(test, config.max_sessions, config.seed), model.item_ids)
    percentile = training_percentiles(model.popularity)
    by_name: dict[str, dict[str, Any]] = {}
    references = tuple(name for name in config.strategies if name in REFERENCES)
    references_clock = time.perf_counter()
    if references:
        say(f"scoring the reference algorithms {', '.join(references)} (not served) on the same targets")
        servable = set(catalog_before(lake, cutoff.timestamp())) | set(model.item_ids)
        by_name |= score_references(
            references, events, test, cutoff.timestamp(), known, config, len(servable), percentile
        )
    references_s = time.perf_counter() - references_clock
    del events

    served = tuple(name for name in config.strategies if name in STRATEGIES or name == BANDIT)
    start = cutoff - timedelta(days=config.warmup_days)
    groups = split_strategies(served, config.workers) if served else []
    jobs = [
        WindowJob(
            config,
            settings,
            version,
            cutoff,
            end,
            time_offset(start.timestamp(), time.time()),
            group,
            test,
            percentile,
            work_dir / f"replay-{i}",
        )  # fmt: skip
        for i, group in enumerate(groups)
    ]
    say(
        f"{test.counts['targets']} next items to predict in {test.counts['test_sessions_scored']} sessions; "
        f"replaying {' | '.join(', '.join(g) for g in groups) or 'nothing (only reference algorithms)'}"
    )
    replay_clock = time.perf_counter()
    results = replay_windows(jobs)
    replay_s = time.perf_counter() - replay_clock

    by_name |= {name: row for result in results for name, row in result["strategies"].items()}
    predictions = test.counts["targets"]
    requests = predictions * len(served)  # served lists; the references' are not requests
    return {
        "lake": config.lake,
        "test_days": config.test_days,
        "cutoff": cutoff.isoformat(),
        "window_end": end.isoformat(),
        "engine": config.engine,
        "model_version": version,
        "ranker_unused": model.manifest.ranker_unused,
        "seed": config.seed,
        "k": config.k,
        "content_vectors": settings.models.content_vectors,
        "redis_masters": results[0]["redis_masters"] if results else 0,
        "protocol": test.counts,
        "repeats_scored": config.protocol.repeats,
        "events_replayed": results[0]["events_replayed"] if results else 0,
        "warmup_events": results[0]["warmup_events"] if results else 0,
        "strategies": {name: by_name[name] for name in config.strategies},
        "reference_strategies": list(references),
        "predictions": predictions,
        "requests": requests,
        "workers": len(jobs),
        "train_s": round(train_s, 1),
        "replay_s": round(replay_s, 1),
        "references_s": round(references_s, 1),
        "predictions_per_s": round(requests / replay_s, 1) if replay_s else 0.0,
        "wall_s": round(time.perf_counter() - clock, 1),
    }


@dataclass(frozen=True)
class WindowJob:
    """What one replay process needs (picklable): the trained version, the test set, its strategies.

    `cutoff` is the test window's start. `model_cutoff`, when earlier, is the version's own cutoff
    (the gate replays a model trained days before its window): the warm-up events after it go
    through the speed layer with the version active and become its deltas, as they would live.
    """

    config: ReplayConfig
    settings: Settings
    version: str
    cutoff: datetime
    end: datetime
    offset_s: float
    strategies: tuple[str, ...]
    test: TestSet
    percentile: dict[str, float]
    work_dir: Path
    model_cutoff: datetime | None = None


def replay_windows(jobs: Sequence[WindowJob]) -> list[dict[str, Any]]:
    """Each job's `replay_window`: in this process for one job, else one process per job."""
    if len(jobs) <= 1:
        return [replay_window(job) for job in jobs]
    # Each process has its own Redis and speed consumer; spawn, so no forked Redis clients or threads.
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(replay_window, jobs))


def replay_window(job: WindowJob) -> dict[str, Any]:
    """Warm the speed layer up, replay the window, and score the job's strategies.

    Besides each strategy's summary, returns the scored targets' event ids in the order they were
    asked (`targets`) and each strategy's rank of every one of them (`ranks`, None when missed), so
    that two replays of the same test set can be compared target by target.
    """
    config, lake = job.config, Lake(job.config.lake)
    start = job.cutoff - timedelta(days=config.warmup_days)
    skew = timedelta(seconds=job.end.timestamp() + job.offset_s - time.time()) + timedelta(days=1)
    with _future_events_accepted(skew):
        history = moved_events(replay_events(lake, start, job.end), job.offset_s)
        window = _first_at(history, job.cutoff.timestamp() + job.offset_s)
        split = _first_at(history, min(job.cutoff, job.model_cutoff or job.cutoff).timestamp() + job.offset_s)
        # The bandit's process serves each of its arms, listed or not (an unlisted one gets no scoreboard).
        arms = BANDIT_ARMS if BANDIT in job.strategies else ()
        served = [name for name in job.strategies if name in STRATEGIES]
        strategies = [STRATEGIES[name] for name in (*served, *(a for a in arms if a not in served))]
        learner = ReplayBandit(arms, config.k, seed=config.seed) if arms else None
        registry = Registry(job.settings.models.root)
        batch_only = any(not strategy.speed for strategy in strategies)
        with window_stores(job.work_dir / "redis", config.redis_cluster, batch_only) as (speed_url, empty_url):
            replayer = Replayer(
                job.settings, speed_url, empty_url, registry, job.version, strategies, config, job.work_dir, learner
            )
            servable = replayer.load_catalog(lake, job.cutoff.timestamp(), job.end.timestamp(), job.offset_s)
            servable |= set(load_model(registry, job.version).item_ids)
            boards = {name: Scoreboard(config.k, len(servable), job.percentile) for name in job.strategies}
            replayer.warm_up(history[:split])
            replayer.replay(history[split:], job.test, boards)
            serve_ms = replayer.serve_ms()
            masters = len(replayer.client.get_primaries()) if is_cluster(replayer.client) else 1  # type: ignore[attr-defined]
            replayer.close()
    return {
        "strategies": {
            name: {**board.summary(), "serve_ms": serve_ms[name]}
            | (learner.summary() if name == BANDIT and learner else {})
            for name, board in boards.items()
        },
        "targets": replayer.asked,
        "ranks": {name: board.ranks for name, board in boards.items()},
        "events_replayed": len(history) - window,
        "warmup_events": window,
        "redis_masters": masters,  # the speed layer's Redis: 1, or the Redis Cluster's masters
    }


@contextmanager
def window_stores(data_dir: Path, cluster: bool, batch_only: bool) -> Iterator[tuple[str, str]]:
    """(speed URL, empty URL) of a window's private Redis, stopped on exit: the speed layer's state, and
    an always-empty store for the batch-only strategies. One redis-server holds both as two databases.
    A Redis Cluster has database 0 only, so there the speed layer gets a cluster as `recs cluster up
    --redis-cluster` starts it and the empty store is a second one of 3 masters, started only when a
    batch-only strategy is replayed (else the empty URL is the speed one's, and nothing reads it)."""
    if not cluster:
        server = RedisServer(data_dir=data_dir, port=free_port(), persist=False)
        server.start()
        try:
            yield _db(server.url, SPEED_DB), _db(server.url, EMPTY_DB)
        finally:
            server.stop()
        return
    clusters = [LocalRedisCluster(data_dir / "speed", tuple(free_cluster_port() for _ in range(6)))]
    if batch_only:
        clusters.append(LocalRedisCluster(data_dir / "empty", tuple(free_cluster_port() for _ in range(3)), replicas=0))
    try:
        for store in clusters:
            store.start()
        yield clusters[0].url, clusters[-1].url
    finally:
        for store in clusters:
            store.stop()


def _first_at(events: Sequence[Event], moment_s: float) -> int:
    """Index of the first event that arrived at or after `moment_s` (len(events) when none did)."""
    return next((i for i, e in enumerate(events) if _arrival_s(e) >= moment_s), len(events))


def split_strategies(names: Sequence[str], workers: int) -> list[tuple[str, ...]]:
    """Strategies grouped for `workers` processes, the costliest first onto the least loaded group."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(names))))]
    load = [0.0] * len(groups)
    for name in sorted(names, key=lambda n: -SERVE_COST[n]):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += SERVE_COST[name]
    return [tuple(n for n in names if n in group) for group in groups]


def score_references(
    names: Sequence[str],
    events: pd.DataFrame,
    test: TestSet,
    cutoff_s: float,
    train_items: Collection[str],
    config: ReplayConfig,
    catalog_size: int,
    percentile: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Fit each reference algorithm on the sessions before the cutoff and score it on the test set's targets.

    Same targets, k and Scoreboard as the served strategies; a list is the reference's answer for the
    target's session prefix (its protocol events before the target). `serve_ms` is the mean time
    per list, `fit_s` the training time. `train_items`: the items `test` was selected with.
    """
    sessions = training_sessions(events, cutoff_s, config.protocol)
    prefixes = target_prefixes(events, test, cutoff_s, train_items, config.protocol)
    targets = list(zip(test.targets["item_id"], test.targets["purchased"], test.targets["new_item"], strict=True))
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        clock = time.perf_counter()
        reference = REFERENCES[name]().fit(sessions)
        fit_s = time.perf_counter() - clock
        board = Scoreboard(config.k, catalog_size, percentile)
        serve_s = 0.0
        for prefix, (item, purchased, new_item) in zip(prefixes, targets, strict=True):
            clock = time.perf_counter()
            ranked = reference.recommend(prefix, config.k)
            serve_s += time.perf_counter() - clock
            board.add(ranked, item, bool(purchased), new_item=bool(new_item))
        serve_ms = round(1000 * serve_s / len(targets), 3) if targets else 0.0
        rows[name] = {**board.summary(), "serve_ms": serve_ms, "fit_s": round(fit_s, 2)}
    return rows


# ---------------------------------------------------------------- window, training, data


def test_window(lake: Lake, test_days: int) -> tuple[datetime, datetime]:
    """(cutoff, end): the last `test_days` whole UTC days of the lake's events."""
    days = lake.event_days()
    if not days:
        raise ValueError(f"the lake at {lake.root} holds no events")
    end = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), UTC)
    return end - timedelta(days=test_days), end


def train(settings: Settings, cutoff: datetime, engine: str) -> str:
    """The nightly DAG's training steps, then the version is made current; returns it.

    Left out: the erasure step (the lake stays read-only) and the gate with its replay, which would
    replay the day before this window to decide whether to publish: this replay reports on the
    version the nightly run trains whatever the gate would say about it.
    """
    from spark_jobs import pipeline
    from spark_jobs.plan import make_plan

    plan = make_plan(settings, cutoff, engine)
    pipeline.validate(settings, plan.cutoff)
    steps = (pipeline.build_interactions, pipeline.train_als, pipeline.train_content_map, pipeline.train_ranker, pipeline.evaluate)
    for step in steps:
        step(plan, settings)
    registry = Registry(settings.models.root)
    if registry.current() != plan.version:
        registry.activate(plan.version)
    return plan.version


def catalog_before(lake: Lake, cutoff_s: float) -> dict[str, ItemInfo]:
    """The catalog snapshot's items created before the cutoff: serving's catalog in the replay."""
    return {item_id: info for item_id, info in _catalog(lake).items() if info.created_at_s < cutoff_s}


def catalog_arrivals(lake: Lake, cutoff_s: float, end_s: float) -> list[ItemInfo]:
    """The catalog's items created in [cutoff, end), oldest first: put into serving's catalog as they
    are created, as a store's `PUT /v1/catalog/items` would."""
    created = [info for info in _catalog(lake).values() if cutoff_s <= info.created_at_s < end_s]
    return sorted(created, key=lambda info: (info.created_at_s, info.item_id))


def _catalog(lake: Lake) -> dict[str, ItemInfo]:
    full = CatalogView.from_lake(lake)
    return {
        item_id: info
        for item_id in lake.read_catalog()["item_id"].to_pylist()
        if (info := full.get(item_id)) is not None
    }


def protocol_events(lake: Lake, end: datetime) -> pd.DataFrame:
    """Every event before `end` in replay order, with the protocol's columns."""
    table = lake.read_events(
        end=end, columns=["event_id", "event_type", "session_id", "item_id", "received_at", "ts"]
    )
    table = table.sort_by([("received_at", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])
    frame = table.select(["event_id", "event_type", "session_id", "item_id"]).to_pandas()
    frame["t"] = table["received_at"].cast(pa.int64()).to_numpy() / 1e6
    return frame[PROTOCOL_COLUMNS]


def replay_events(lake: Lake, start: datetime, end: datetime) -> pa.Table:
    """The events received in [start, end), in replay order."""
    table = lake.read_events(start=start, end=end)
    return table.sort_by([("received_at", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])


def time_offset(first_s: float, now_s: float) -> float:
    """Whole weeks that move `first_s` to at least an hour after `now_s` (weekday and time of day kept)."""
    return max(0, math.ceil((now_s + 3600.0 - first_s) / WEEK_S)) * WEEK_S


def moved_events(table: pa.Table, offset_s: float) -> list[Event]:
    """The events with ts and received_at moved by `offset_s`."""
    shift = pa.scalar(int(offset_s * 1e6), pa.duration("us"))
    for name in ("ts", "received_at"):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pc.add(table[name], shift))
    return table_to_events(table)


@contextmanager
def _future_events_accepted(skew: timedelta) -> Iterator[None]:
    """Let the ingestion check accept the moved events (it refuses clocks more than an hour ahead)."""
    saved = event_contract.MAX_CLOCK_SKEW
    event_contract.MAX_CLOCK_SKEW = max(saved, skew)
    try:
        yield
    finally:
        event_contract.MAX_CLOCK_SKEW = saved


def _run_settings(settings: Settings, config: ReplayConfig, work_dir: Path) -> Settings:
    """The base settings with the lake to read and a private var dir and registry under `work_dir`."""
    return settings.model_copy(
        update={
            "var_dir": work_dir / "var",
            "lake": settings.lake.model_copy(update={"root": config.lake}),
            "models": settings.models.model_copy(update={"root": str(work_dir / "models")}),
            "training": settings.training.model_copy(update={"seed": config.seed, "engine": config.engine}),
        }
    )


def training_percentiles(popularity: pa.Table | None) -> dict[str, float]:
    """item -> popularity percentile in a version's popularity table (the Scoreboard's popularity bias)."""
    if popularity is None:
        return {}
    counts = zip(popularity["item_id"].to_pylist(), map(float, popularity["count"].to_pylist()), strict=True)
    return popularity_percentiles(dict(counts))


def _arrival_s(event: Event) -> float:
    assert event.received_at is not None  # lake events are always received
    return event.received_at.timestamp()


# ---------------------------------------------------------------- batching


def chunk_bounds(
    events: Sequence[Event], scored: set[str], span_s: float, max_events: int
) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of consecutive events that one speed-layer batch can apply together.

    Lists for a range's scored events are served before the range is applied, so a range is closed
    before a scored event whose person or session already has an event in it: every list sees all
    earlier events of its own person and session. Other people's events of the same range (at most
    `span_s` of event time) are seen one batch late, as a live consumer's batching would.
    """
    start, touched = 0, set[tuple[str, str]]()
    first_s = _arrival_s(events[0]) if events else 0.0
    for i, event in enumerate(events):
        keys = _identity(event)
        full = i - start >= max_events or _arrival_s(event) - first_s > span_s
        if i > start and (full or (event.event_id in scored and not keys.isdisjoint(touched))):
            yield start, i
            start, touched, first_s = i, set(), _arrival_s(event)
        touched |= keys
    if start < len(events):
        yield start, len(events)


def _identity(event: Event) -> set[tuple[str, str]]:
    keys = {("anonymous", event.anonymous_id)}
    if event.user_id:
        keys.add(("user", event.user_id))
    if event.session_id:
        keys.add(("session", event.session_id))
    return keys


# ---------------------------------------------------------------- the replay


class Replayer:
    """One Redis, one in-process speed consumer, one serving state per strategy; events applied in order.
    `speed_url` holds the speed layer's state; batch-only strategies read the always-empty `empty_url`."""

    def __init__(
        self,
        settings: Settings,
        speed_url: str,
        empty_url: str,
        registry: Registry,
        version: str,
        strategies: Sequence[Strategy],
        config: ReplayConfig,
        work_dir: Path,
        bandit: ReplayBandit | None = None,
    ) -> None:
        self.settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": speed_url})})
        self.urls = {True: speed_url, False: empty_url}  # by Strategy.speed
        self.registry = registry
        self.version = version
        self.strategies = list(strategies)
        self.boards: dict[str, Scoreboard] = {}
        self.config = config
        self.work_dir = work_dir
        self.client = connect(speed_url, timeout_s=REDIS_TIMEOUT_S)
        self.stream_key = redis_keys.stream(self.settings.redis.stream)
        self.consumer: SpeedConsumer | None = None
        if any(s.speed for s in self.strategies):
            # An empty lake: the version switch must find no history to rebuild deltas from (see switch_version).
            self.consumer = SpeedConsumer(
                self.client, self.settings, registry, Lake(str(work_dir / "empty-lake")), name="replay"
            )
            self.consumer.applier = Applier(self.client, self.settings, seed=config.seed)  # seeded negatives
        self.states: dict[str, ServingState] = {}
        self.bandit = bandit  # shows one of its arms' lists at each moment, as the `bandit` strategy
        self.serve_s: dict[str, float] = {s.name: 0.0 for s in self.strategies} | {BANDIT: 0.0}
        self.asked: list[str] = []  # the scored events' ids, in the order the boards got them
        self.last_trending_s = -math.inf
        self.arrivals: list[ItemInfo] = []  # catalog items created in the window, oldest first
        self.catalog: CatalogView | None = None
        self.models: ModelHolder | None = None

    # ------------------------------------------------------------ set-up

    def load_catalog(self, lake: Lake, cutoff_s: float, end_s: float, offset_s: float) -> set[str]:
        """Seed the live item state (categories, stock) and build serving's catalog and model; returns its items.

        Serving's catalog holds the items created before the cutoff (the snapshot is newer than the
        window, and its later items would be offered before they exist), their dates moved too; the
        items created in the window join it at their creation (`_add_arrivals`).
        """
        self.arrivals = [
            replace(info, created_at_s=info.created_at_s + offset_s)
            for info in catalog_arrivals(lake, cutoff_s, end_s)
        ]
        if self.consumer is not None:
            load_items(self.client, table_to_items(lake.read_catalog()))
        items = {
            item_id: replace(info, created_at_s=info.created_at_s + offset_s)
            for item_id, info in catalog_before(lake, cutoff_s).items()
        }
        catalog = CatalogView(items)
        if self.consumer is not None:  # what serving's catalog holds, the speed layer's versions see too
            self.consumer.add_contents(catalog.contents())
        # One loaded model, shared read-only by the strategies.
        models = ModelHolder(self.registry, catalog, content_vectors=self.settings.models.content_vectors)
        models.reload(self.version)
        self.catalog, self.models = catalog, models
        plain_rules = write_plain_rules(self.settings.api.rules_file, self.work_dir / "rules-plain.yaml")
        for strategy in self.strategies:
            self.states[strategy.name] = _serving_state(
                strategy_settings(self.settings, strategy, plain_rules, self.urls[strategy.speed]), self.registry,
                catalog, models,
                self.work_dir / "impressions",
            )  # fmt: skip
        return set(items)

    def warm_up(self, events: Sequence[Event]) -> None:
        """Apply the events before the window with no model in the speed layer, then switch to the version.

        The batch model already holds these events, so they must not become deltas: the speed layer
        has no version while they go in, and the stream is emptied before the switch reads it.
        """
        if self.consumer is None:
            return
        size = self.settings.speed.batch_size
        for start in range(0, len(events), size):
            self._apply(events[start : start + size])
        self.client.xtrim(self.stream_key, maxlen=0)
        self.consumer.switch_to(self.version)
        if events:
            self._refresh_trending(_arrival_s(events[-1]))

    # ------------------------------------------------------------ the window

    def replay(self, events: Sequence[Event], test: TestSet, boards: dict[str, Scoreboard]) -> None:
        """Serve and score the test set's moments while applying `events` (the window, after any events
        between the version's cutoff and the window) in order."""
        self.boards = boards
        targets = {
            row.event_id: (row.item_id, bool(row.purchased), bool(row.new_item))
            for row in test.targets.itertuples(index=False)
        }
        for start, end in chunk_bounds(
            events, set(targets), self.config.chunk_span_s, self.settings.speed.batch_size
        ):
            self._add_arrivals(_arrival_s(events[start]))
            for event in events[start:end]:
                if event.event_id in targets:
                    self._ask(event, *targets[event.event_id])
            self._apply(events[start:end])

    def _add_arrivals(self, now_s: float) -> None:
        """The items created by `now_s` join serving's catalog, with their content vectors (as after a PUT)."""
        due = 0
        while due < len(self.arrivals) and self.arrivals[due].created_at_s <= now_s:
            due += 1
        if due == 0 or self.catalog is None or self.models is None:
            return
        added, self.arrivals = self.arrivals[:due], self.arrivals[due:]
        self.catalog.add(added)
        self.models.add_content_vectors([info.item_id for info in added])
        if self.consumer is not None:
            self.consumer.add_contents({info.item_id: info.content for info in added})

    def _ask(self, event: Event, item: str, purchased: bool, new_item: bool) -> None:
        """Ask every strategy for a list at the moment just before `event`, and score it."""
        now_s = _arrival_s(event)
        if self.consumer is not None:
            self._refresh_trending(now_s)
        request = RecRequest(event.user_id, event.anonymous_id, event.session_id, self.config.k, CONTEXT)
        self.asked.append(event.event_id)
        lists: dict[str, list[str]] = {}
        degraded: dict[str, bool] = {}
        spent: dict[str, float] = {}
        for name, state in self.states.items():
            clock = time.perf_counter()
            result = recommend(state, request, now_s=now_s)
            spent[name] = time.perf_counter() - clock
            self.serve_s[name] += spent[name]
            lists[name], degraded[name] = [i.item_id for i in result.items], result.degraded is not None
            if name in self.boards:
                self.boards[name].add(lists[name], item, purchased, degraded[name], new_item)
        if self.bandit is not None:
            arm = self.bandit.step(lists, item)
            self.serve_s[BANDIT] += spent[arm]
            self.boards[BANDIT].add(lists[arm], item, purchased, degraded[arm], new_item)

    def _apply(self, events: Sequence[Event]) -> None:
        """Append to the stream and let the consumer process exactly these entries (its batch code)."""
        if self.consumer is None or not events:
            return
        append_events(
            self.client, events, self.settings.redis.stream, self.settings.redis.stream_retention_ms
        )
        left = len(events)
        while left > 0:
            reply: Any = self.client.xreadgroup(  # redis-py's reply types are unions of every shape
                self.settings.speed.group, self.consumer.name, {self.stream_key: ">"}, count=left
            )
            entries = [(entry_id, fields) for entry_id, fields in reply[0][1]] if reply else []
            if not entries:
                raise RuntimeError(f"the stream gave {len(events) - left} of {len(events)} appended events")
            result = self.consumer.process(entries)
            if result.failed or result.unresolved:
                raise RuntimeError(
                    f"the speed layer refused replayed events: {result.failed or result.unresolved}"
                )
            left -= len(entries)

    def _refresh_trending(self, now_s: float) -> None:
        """Re-sum trending as a live consumer does every trending_refresh_s, on the replay's clock."""
        if now_s - self.last_trending_s < self.settings.speed.trending_refresh_s:
            return
        assert self.consumer is not None
        self.client.delete(
            redis_keys.TRENDING_REFRESH_LOCK
        )  # the lock guards against other consumers: none here
        self.consumer.refresh_trending(now_s=now_s)
        self.last_trending_s = now_s

    # ------------------------------------------------------------ the end

    def serve_ms(self) -> dict[str, float]:
        """Mean serving time per list, by strategy."""
        asked = {name: len(board.ranks) for name, board in self.boards.items()}
        return {name: round(1000 * self.serve_s[name] / n, 2) if n else 0.0 for name, n in asked.items()}

    def close(self) -> None:
        for state in self.states.values():
            state.close()
        if self.consumer is not None:
            self.consumer.pubsub.close()
        self.client.close()


def _serving_state(
    settings: Settings, registry: Registry, catalog: CatalogView, models: ModelHolder, impressions: Path
) -> ServingState:
    """What the API's lifespan builds (ServingState.start), less its listeners: the replay activates the version."""
    lake = Lake(str(impressions))
    return ServingState(
        settings=settings,
        lake=lake,
        registry=registry,
        rules=load_rules(settings.api.rules_file),
        catalog=catalog,
        models=models,
        redis=RedisGate(connect(settings.redis.effective_url, timeout_s=REDIS_TIMEOUT_S)),
        impressions=ImpressionLogger(lake),
    )


def _db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def cleanup(work_dir: Path) -> None:
    shutil.rmtree(work_dir, ignore_errors=True)
