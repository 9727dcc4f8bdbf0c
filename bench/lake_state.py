"""`recs bench serve|speed --lake DIR`: the benches' state from a store's own events instead of the
synthetic model.

The batch layer is trained (as the nightly run would, `implicit` engine) on the lake's events before the
last `days` days; those days' events, moved so that the last one happened a minute ago, go through the
real speed consumer (bench/speed.py times one consumer draining them); the serve benches' request mix
is the people seen last (users, devices mid-session, the product pages of items they viewed). On real
clicks sessions are long and share popular items, so the session-kNN reads cost what they cost a store
(on the Online Retail lake ~2 ms of Redis a read, against ~0.35 ms on the synthetic state).

Training takes minutes on a real lake: with `models` the trained version is kept there and reused by
the next run on the same lake and days (its version names the cutoff).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from bench.serve import LiveState, Visitor, fold_into_speed_state, request_paths
from common.lake import Lake
from common.registry import Registry
from common.settings import Settings


def build_lake_state(
    root: Path, lake_root: str, days: int, visitors: int = 2000, requests: int = 2000, models: Path | None = None
) -> LiveState:
    """Train (or reuse `models`' version), start a private Redis under `root`, fold the last `days` days
    through the speed consumer; `stop()` it when done."""
    from common.redis_server import RedisServer, free_port

    redis_server = RedisServer(data_dir=root / "redis", port=free_port(), persist=False)
    redis_server.start()
    try:
        settings = lake_settings(root, lake_root, models or root / "models", redis_server.url)
        version = trained_version(settings, days)
        client = redis_server.client()
        lake = Lake(lake_root)
        events = recent_events(lake, days)
        folded = fold_into_speed_state(client, settings, version, lake, events)
        env = {
            **os.environ,
            "RECS_VAR_DIR": str(settings.var_dir),
            "RECS_LAKE__ROOT": lake_root,
            "RECS_MODELS__ROOT": settings.models.root,
            "RECS_REDIS__URL": redis_server.url,
        }
        return LiveState(redis_server, client, env, request_paths(last_visitors(events, visitors), requests), folded)
    except BaseException:
        redis_server.stop()
        raise


def lake_settings(root: Path, lake_root: str, models: Path, redis_url: str) -> Settings:
    """Settings reading `lake_root` (never written: the var dir and the registry are elsewhere) and the
    bench's own Redis."""
    base = Settings()
    return base.model_copy(
        update={
            "var_dir": root / "var",
            "redis": base.redis.model_copy(update={"url": redis_url}),
            "lake": base.lake.model_copy(update={"root": lake_root}),
            "models": base.models.model_copy(update={"root": str(models)}),
            "training": base.training.model_copy(update={"engine": "implicit"}),
        }
    )


def trained_version(settings: Settings, days: int) -> str:
    """The current version of the registry when it was trained up to the last `days` days of the lake,
    else a version trained now and made current."""
    from evaluation.replay import test_window, train
    from spark_jobs.plan import make_plan

    cutoff, _ = test_window(Lake(settings.lake.root), days)
    version = make_plan(settings, cutoff).version  # names the cutoff and the engine
    if Registry(settings.models.root).current() == version:
        return version
    return train(settings, cutoff, settings.training.engine)


def recent_events(lake: Lake, days: int) -> list[Any]:
    """The last `days` whole days' events in arrival order, moved so that the last one was a minute ago."""
    from evaluation.replay import moved_events, replay_events, test_window

    start, end = test_window(lake, days)
    table = replay_events(lake, start, end)
    last_s = pc.max(table["received_at"]).as_py().timestamp()
    return moved_events(table, time.time() - 60.0 - last_s)


def last_visitors(events: Sequence[Any], n: int) -> list[Visitor]:
    """The `n` sessions last active (a device's session, whoever signed in during it), each with its
    signed-in user if any and its items (oldest first)."""
    items: dict[tuple[str, str], list[str]] = {}
    users: dict[tuple[str, str], str | None] = {}
    for event in reversed(events):
        if event.item_id is None or event.session_id is None:
            continue
        session = (event.anonymous_id, event.session_id)
        if session not in items:
            if len(items) == n:
                continue
            items[session] = []
        items[session].append(event.item_id)
        users[session] = users.get(session) or event.user_id
    return [Visitor(users[key], key[0], key[1], seen[::-1]) for key, seen in items.items()]
