"""Small factories for the speed-layer tests: settings, a published model, events on the stream."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import redis

from common.catalog import ItemUpdate
from common.catalog_state import apply_item_updates
from common.events import DEFAULT_CONSENT, Consent, Event, EventType, new_event_id
from common.model import save_factors
from common.registry import Manifest, Registry
from common.settings import Settings, SpeedSettings, TrainingSettings
from common.stream import append_events


def speed_settings(tmp_path: Path, redis_url: str, **speed: object) -> Settings:
    base = SpeedSettings().model_dump()
    base.update({"block_ms": 10, "claim_idle_ms": 200, "claim_interval_s": 0.05, **speed})
    return Settings(
        var_dir=tmp_path,
        redis={"url": redis_url},  # type: ignore[arg-type]
        lake={"root": str(tmp_path / "lake"), "flush_events": 50, "flush_seconds": 0.2},  # type: ignore[arg-type]
        models={"root": str(tmp_path / "models")},  # type: ignore[arg-type]
        speed=SpeedSettings(**base),
    )


def publish_model(
    registry: Registry,
    version: str,
    cutoff: datetime,
    item_factors: np.ndarray,
    user_ids: Sequence[str],
    user_factors: np.ndarray | None = None,
    activate: bool = True,
) -> None:
    """Write a version's factors and manifest (items are named i0, i1, ...), and activate it."""
    k = item_factors.shape[1]
    if user_factors is None:
        user_factors = np.full((len(user_ids), k), 0.1, dtype=np.float32)
    item_ids = [f"i{j}" for j in range(len(item_factors))]
    save_factors(registry, version, list(user_ids), user_factors, item_ids, item_factors, top_items=TrainingSettings().top_items_kept)
    now = datetime.now(UTC)
    registry.write_manifest(Manifest(version=version, created_at=now, cutoff=cutoff, engine="test"))
    if activate:
        registry.activate(version)


def set_categories(client: redis.Redis, categories: dict[str, str]) -> None:
    apply_item_updates(client, [ItemUpdate(item_id=i, category_path=[c]) for i, c in categories.items()])


def within_one_day(ago: timedelta, span: timedelta) -> datetime:
    """A start about `ago` before now such that [start, start + span] lies in one UTC day, so that a test's
    events share one popularity-day key: just after midnight, `ago` before now can be late yesterday."""
    start = datetime.now(UTC) - ago
    end = start + span
    if end.date() != start.date():
        start = end.replace(hour=0, minute=0, second=0, microsecond=0)
    return start


def make_event(
    event_type: EventType = EventType.VIEW,
    item_id: str | None = "i0",
    anonymous_id: str = "anon-1",
    user_id: str | None = None,
    session_id: str | None = "s1",
    ts: datetime | None = None,
    received_at: datetime | None = None,
    quantity: int | None = None,
    consent: Consent = DEFAULT_CONSENT,
) -> Event:
    now = datetime.now(UTC)
    return Event(
        event_id=new_event_id(),
        event_type=event_type,
        ts=ts or now - timedelta(seconds=1),
        received_at=received_at or now,
        anonymous_id=anonymous_id,
        user_id=user_id,
        session_id=session_id,
        item_id=item_id if event_type != EventType.IDENTIFY and event_type != EventType.SEARCH else None,
        query="shoes" if event_type == EventType.SEARCH else None,
        quantity=quantity,
        consent=consent,
    )


def add_events(client: redis.Redis, settings: Settings, events: Sequence[Event]) -> list[str]:
    return append_events(client, events, settings.redis.stream, settings.redis.stream_retention_ms)
