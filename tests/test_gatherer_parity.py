"""One path for training and serving: at the same moments, the serving side (the real speed layer in a
real Redis, read by serving's request code) and the training side (the event log at that moment,
spark_jobs/replay.py) gather the same candidate pool and the same feature matrix, items new since the
model's cutoff (content vectors) included."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import redis

from bench.serve import publish_synthetic_model
from common import redis_keys
from common.catalog import Item, items_to_table, table_to_items
from common.catalog_state import load_items
from common.events import Event, EventType, deterministic_event_id, events_to_table
from common.features import FEATURE_NAMES, compute_features
from common.gatherer import pool
from common.lake import Lake
from common.model import ModelArtifacts, load_model, save_table
from common.redis_server import RedisServer
from common.registry import COVISITATION, Registry
from common.settings import ApiSettings, CandidatePool, Settings
from serving.core.catalog_view import CatalogView
from serving.core.impressions import ImpressionLogger
from serving.core.model_holder import ModelHolder
from serving.core.recommender import RecRequest, feature_inputs, gather_request, read_speed
from serving.core.rules import Rules
from serving.core.state import RedisGate, ServingState
from spark_jobs.ranker import feature_rows
from spark_jobs.replay import PointInTime, build_requests, load_log
from spark_jobs.tables import COVISITATION_SCHEMA
from speed_layer.consumer import SpeedConsumer
from speed_layer.effects import Applier
from tests.speed_factories import speed_settings

# Sessions that share item sequences, so ordered co-visits, bestsellers and trending all have content.
# n1 and n2 are new since the model's cutoff: they have content vectors only.
PATHS = [
    ("u1", None, ["i1", "i9", "i17", "i25", "i2"]),
    ("u2", None, ["i1", "n1", "i33", "i17", "i41"]),
    (None, "guest-a", ["i9", "i17", "n1", "i49", "i3"]),
    ("u3", None, ["i1", "i17", "n2", "i25", "i57"]),
    (None, "guest-b", ["i4", "i12", "i1", "i9", "i17"]),
    ("u1", None, ["i9", "i25", "i2", "i10", "i18"]),
]


def shop_events(start: datetime) -> list[Event]:
    """The paths as interleaved sessions (one event every 13 s), with carts and a purchase in each."""
    events: list[Event] = []
    step = 0
    for position in range(max(len(p) for _, _, p in PATHS)):
        for n, (user, guest, path) in enumerate(PATHS):
            if position >= len(path):
                continue
            kind = EventType.ADD_TO_CART if position % 2 else EventType.VIEW
            for event_type in (kind, EventType.PURCHASE) if position == 3 else (kind,):
                step += 1
                at = start + timedelta(seconds=13 * step)
                events.append(
                    Event(
                        event_id=deterministic_event_id("parity", step),
                        event_type=event_type,
                        ts=at,
                        received_at=at,
                        anonymous_id=guest or f"device-{user}",
                        user_id=user,
                        session_id=f"s{n}",
                        item_id=path[position],
                        quantity=2 if event_type == EventType.PURCHASE else None,
                    )
                )
    return events


def published_shop(settings: Settings) -> tuple[Lake, Registry, ModelArtifacts, list[Event]]:
    """A published synthetic version that saw no sessions, two catalog items new since its cutoff, and
    the shop's events after it in the lake."""
    lake, registry = Lake(settings.lake.root), Registry(settings.models.root)
    publish_synthetic_model(registry, lake, n_items=64, n_users=8, factors=8, activate=False)
    manifest = registry.read_manifest("v1")
    parameters = {**manifest.parameters, "training": settings.training.model_dump()}  # as the pipeline records it
    registry.write_manifest(manifest.model_copy(update={"parameters": parameters}))
    # The version saw no sessions (every event below comes after its cutoff): no batch co-visits.
    save_table(registry, "v1", COVISITATION, pa.table({"item_id": [], "other_id": [], "count": []}, schema=COVISITATION_SCHEMA))
    registry.activate("v1", kind="published")
    model = load_model(registry, "v1")
    new_items = [
        Item(item_id=f"n{n}", title=f"Item {64 + n}", category_path=["Root", "cat1"], price=11.0 * n,
             created_at=model.manifest.cutoff + timedelta(minutes=1))
        for n in (1, 2)
    ]  # fmt: skip
    lake.write_catalog(pa.concat_tables([lake.read_catalog(), items_to_table(new_items)]))
    events = shop_events(model.manifest.cutoff + timedelta(minutes=5))
    assert events[-1].ts < datetime.now(UTC)
    lake.write_events(events_to_table(events))
    return lake, registry, model, events


def serving_state(settings: Settings, lake: Lake, registry: Registry, client: redis.Redis) -> ServingState:
    catalog = CatalogView.from_lake(lake)
    models = ModelHolder(registry, catalog)
    models.reload()
    return ServingState(
        settings=settings,
        lake=lake,
        registry=registry,
        rules=Rules(),
        catalog=catalog,
        models=models,
        redis=RedisGate(client),
        impressions=ImpressionLogger(Lake(str(settings.var_dir / "impressions"))),
    )


def test_serving_and_training_gather_the_same_pool_and_features(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    base = speed_settings(tmp_path, redis_server.url, neighbour_sessions_per_item=2)  # rows read truncated
    # Few neighbours and a small sample, so that which sessions qualify (never the session itself) matters.
    pool_sizes = CandidatePool(neighbour_sample=4, neighbour_k=2)
    settings = base.model_copy(
        update={
            "api": ApiSettings(rules_file=tmp_path / "no-rules.yaml"),
            "training": base.training.model_copy(update={"candidates": pool_sizes}),
        }
    )
    lake, registry, model, events = published_shop(settings)
    load_items(redis_client, table_to_items(lake.read_catalog()))

    # Training side: the log up to each moment.
    log = load_log(lake, datetime.now(UTC) + timedelta(hours=1), settings.training)
    pit = PointInTime.at(log, model, settings.training, settings.speed, events[0].ts.timestamp(), content_vectors=True)
    requests = build_requests(log, -np.inf, np.inf, limit=1000, seed=1)
    assert len(requests) >= 15

    # Serving side: the speed layer applies the events before each moment, then serving gathers.
    state = serving_state(settings, lake, registry, redis_client)
    consumer = SpeedConsumer(redis_client, settings, registry, lake, name="parity")
    applier = Applier(redis_client, settings)
    served_model = state.models.current
    assert served_model is not None and served_model.artifacts.is_content_vector("n1")
    applied = 0
    compared = 0
    new_in_als = 0
    with_history = 0
    try:
        for request in requests:
            applier.apply(events[applied : request.at], [])  # no version: batch vectors only, as training
            applied = request.at
            redis_client.delete(redis_keys.TRENDING_REFRESH_LOCK)  # one consumer here: no need to wait for it
            consumer.refresh_trending(now_s=request.now_s)
            event = events[request.at]
            req = RecRequest(event.user_id, event.anonymous_id, event.session_id, 20, "home")
            speed = read_speed(state, req, served_model, request.now_s)
            assert speed is not None
            served = gather_request(state, served_model, req, speed, personal=True, now_s=request.now_s)
            served_ids, served_sources = pool(served.gathered)
            served_features = compute_features(
                served.moment, feature_inputs(served_model, served, served_ids, served_sources)
            )

            trained_state = pit.state(request)
            trained, trained_cands = pit.gather(request, trained_state)
            assert {k: [i for i, _ in v] for k, v in served.gathered.lists.items()} == {
                k: [i for i, _ in v] for k, v in trained.lists.items()
            }, request
            assert served_ids == trained_cands.item_ids
            np.testing.assert_allclose(
                served_features, compute_features(trained_state, trained_cands), rtol=1e-6, atol=1e-6,
                err_msg=f"features differ at {request.now_s} ({list(FEATURE_NAMES)})",
            )  # fmt: skip
            compared += 1
            new_in_als += any(i in ("n1", "n2") for i, _ in trained.lists.get("als", []))
            with_history += bool(trained.lists.get("history"))
    finally:
        consumer.pubsub.close()
        state.close()
    assert compared == len(requests)
    # New items were candidates by their content vectors, on both sides (with batch vectors only they never are).
    assert pit.model.is_content_vector("n2") and new_in_als > 0
    # The version's history of the signed-in people (bench.serve.synthetic_history) was read on both sides.
    assert with_history > 0
    # The comparison had content: ordered co-visits, session neighbours, bestsellers and trending all fed it.
    assert all(k in trained.lists and trained.lists[k] for k in ("covis", "neighbours", "category", "trending", "als"))


def test_a_point_in_time_carried_into_a_later_window_gives_what_a_fresh_one_gives(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The ranker step carries one PointInTime from its training window into the validation window after
    it (spark_jobs.pipeline.ranker_rows) instead of counting the whole log again up to the second."""
    base = speed_settings(tmp_path, redis_server.url, neighbour_sessions_per_item=2)
    pool_sizes = CandidatePool(neighbour_sample=4, neighbour_k=2)
    settings = base.model_copy(update={"training": base.training.model_copy(update={"candidates": pool_sizes})})
    lake, _, model, events = published_shop(settings)
    log = load_log(lake, datetime.now(UTC) + timedelta(hours=1), settings.training)
    requests = build_requests(log, -np.inf, np.inf, limit=1000, seed=1)
    first, later = requests[: len(requests) // 2], requests[len(requests) // 2 :]

    def point_in_time(start_s: float) -> PointInTime:
        return PointInTime.at(log, model, settings.training, settings.speed, start_s, content_vectors=True)

    carried = point_in_time(events[0].ts.timestamp())
    assert feature_rows(carried, first).requests > 0
    went_on, fresh = feature_rows(carried, later), feature_rows(point_in_time(later[0].now_s), later)
    assert went_on.requests == fresh.requests > 0 and went_on.groups == fresh.groups
    np.testing.assert_array_equal(went_on.features, fresh.features)
    np.testing.assert_array_equal(went_on.labels, fresh.labels)
    # The later moments read co-visits counted before them, in the first window too.
    assert fresh.features[:, FEATURE_NAMES.index("covis")].any()
