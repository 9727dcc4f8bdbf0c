"""Fixtures and helpers for the serving tests: a small published model, the app on real Redis, speed-state seeding.

Speed-layer state is seeded directly in the formats `common/speed_state.py` reads (keys from
`common/redis_keys.py`), because the speed layer's effects are not exposed through `common/`.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel, publish_synthetic_model
from common import redis_keys
from common.lake import Lake
from common.registry import Registry
from common.sequence import FOLLOW_UNIT
from common.settings import ApiSettings, Settings, load_settings
from serving.core.state import ServingState
from serving.main import create_app

KEYS = {
    "key-storefront-0001": ["events:write"],
    "key-reader-0002": ["recs:read"],
    "key-admin-0003": ["admin", "recs:read", "events:write"],
    "key-shop-0004": ["events:write", "recs:read"],  # a storefront's server: exchanged for session tokens
}
SHOP_KEY = "key-shop-0004"
TOKEN_SECRET = "test-token-secret-0123456789abcdef"  # settings in tests only; never a default


def make_settings(**api: Any) -> Settings:
    """Settings from the recs_env environment (temp dirs, test Redis); `api` fields override the API section."""
    rules = Path(__file__).resolve().parents[1] / "serving" / "rules.yaml"
    return load_settings(api=ApiSettings(**{"rules_file": rules, **api}))


@pytest.fixture(scope="session")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticModel]:
    """Publish the small model once per session; each test gets a copy (training the ranker takes a while)."""
    root = tmp_path_factory.mktemp("serving-model")
    model = publish_synthetic_model(Registry(str(root / "models")), Lake(str(root / "lake")))
    return root, model


@pytest.fixture
def published(
    model_template: tuple[Path, SyntheticModel], recs_env: Path, redis_client: redis.Redis
) -> SyntheticModel:
    """The small model published as v1 (CURRENT) in this test's registry, its catalog in this test's lake."""
    root, model = model_template
    shutil.copytree(root / "models", recs_env / "models")
    shutil.copytree(root / "lake", recs_env / "lake")
    return model


@pytest.fixture
def client(published: SyntheticModel, recs_env: Path) -> Iterator[TestClient]:
    """The app (auth off) on the published model and the test Redis."""
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def serving_state(test_client: TestClient) -> ServingState:
    state: ServingState = test_client.app.state.serving  # type: ignore[attr-defined]
    return state


def view_event(person: str, item: str, session: str = "s1", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "view",
        "ts": datetime.now(UTC).isoformat(),
        "anonymous_id": person,
        "session_id": session,
        "item_id": item,
        **extra,
    }


def seed_session_view(
    client: redis.Redis,
    person: str,
    session: str,
    item: str,
    category: str,
    covisited: dict[str, float],
    weight: float = 1.0,
) -> None:
    """What the speed layer writes for a view: session recents, session affinity, person items, co-visits
    (`covisited` as weights, written in units as the speed layer keeps them)."""
    now = redis_keys.time_score(datetime.now(UTC))
    pipe = client.pipeline()
    pipe.zadd(redis_keys.session_recent(person, session), {item: now})
    pipe.hincrbyfloat(redis_keys.session_categories(person, session), category, 1.0)
    pipe.hset(redis_keys.session_categories(person, session), "_ts", time.time())
    pipe.zadd(redis_keys.person_sessions(person), {session: now})
    pipe.hincrbyfloat(redis_keys.person_items(person), item, weight)
    if covisited:
        pipe.hset(redis_keys.covisitation(item), mapping={other: w * FOLLOW_UNIT for other, w in covisited.items()})
    pipe.execute()


def recs(test_client: TestClient, **params: Any) -> dict[str, Any]:
    response = test_client.get("/v1/recommendations", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def ids(body: dict[str, Any]) -> list[str]:
    return [item["item_id"] for item in body["items"]]
