"""Serving on a registry and a lake on S3 (moto's server, as in test_s3_lake.py): the API loads the
published version's artifacts and the catalog from S3, configured as compose configures it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from bench.serve import SyntheticModel
from common.lake import Lake
from common.registry import Registry
from common.settings import get_settings
from serving.main import create_app
from tests.conftest import S3Bucket
from tests.test_serving_support import make_settings, recs

pytest_plugins = ["tests.test_serving_support"]


def test_serving_loads_the_model_and_catalog_from_s3(
    model_template: tuple[Path, SyntheticModel],
    recs_env: Path,
    s3_bucket: S3Bucket,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, _ = model_template
    registry, lake = Registry(s3_bucket.url("models")), Lake(s3_bucket.url("lake"))
    registry.fs.put(f"{root / 'models'}/", registry.root, recursive=True)
    lake.fs.put(f"{root / 'lake'}/", lake.root, recursive=True)
    monkeypatch.setenv("RECS_MODELS__ROOT", registry.root_url)
    monkeypatch.setenv("RECS_LAKE__ROOT", lake.root_url)
    get_settings.cache_clear()
    assert registry.current() == "v1" and lake.catalog_snapshots()
    with TestClient(create_app(make_settings())) as client:
        body = recs(client, user_id="u3", k=10)
    get_settings.cache_clear()
    assert body["model_version"] == "v1" and body["degraded"] is None
    assert len(body["items"]) == 10
