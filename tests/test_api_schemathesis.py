"""The API against its own OpenAPI: schemathesis generates requests for every route and runs every check.

The app runs under uvicorn (real HTTP, the body and head limits) on a published model and a real
redis-server, once with API keys configured and once without (the embedded demo). Generation is
deterministic (fixed seed, no example database), so a failure here reproduces on every run.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig

from bench.serve import SyntheticModel
from common.redis_server import RedisServer
from common.settings import Settings, get_settings
from serving.main import create_app
from tests.test_serving_limits import serving
from tests.test_serving_support import KEYS, TOKEN_SECRET, make_settings

pytest_plugins = ["tests.test_serving_support"]

pytestmark = pytest.mark.slow  # 35-50 s on 2 cores: two servers, some 2,000 requests

ADMIN_KEY = "key-admin-0003"  # every scope
MAX_EXAMPLES = 30  # per route and generation mode, on top of schemathesis' coverage cases

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 15,
        "generation": {"deterministic": True},
        "max-stream-events": 1,  # the SSE route sends one list at once, then only when the person's state changes
        "request-timeout": 10,
    }
)
# The document does not depend on settings (the security schemes are declared with keys or without).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=CONFIG)


@pytest.fixture(scope="module", params=["open", "secured"])
def api(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    model_template: tuple[Path, SyntheticModel],
    redis_server: RedisServer,
) -> Iterator[tuple[str, dict[str, str]]]:
    """The app under uvicorn on a copy of the published model; yields its base URL and the headers to send."""
    secured = request.param == "secured"
    root, _ = model_template
    var = tmp_path_factory.mktemp(f"schemathesis-{request.param}")
    shutil.copytree(root / "models", var / "models")
    shutil.copytree(root / "lake", var / "lake")
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    with pytest.MonkeyPatch.context() as env:  # what recs_env does, for the module
        env.setenv("RECS_VAR_DIR", str(var))
        env.setenv("RECS_LAKE__ROOT", str(var / "lake"))
        env.setenv("RECS_MODELS__ROOT", str(var / "models"))
        env.setenv("RECS_REDIS__URL", redis_server.url)
        get_settings.cache_clear()
        try:
            # A token secret, so POST /v1/tokens is exercised, not only its 503 for a missing secret.
            api: dict[str, Any] = {"token_secret": TOKEN_SECRET, **({"keys": KEYS} if secured else {})}
            with serving(make_settings(**api)) as port:
                yield f"http://127.0.0.1:{port}", ({"X-API-Key": ADMIN_KEY} if secured else {})
        finally:
            get_settings.cache_clear()


# Rules the document states in words, as OpenAPI cannot: one of two query parameters, a parameter that
# another's value requires, and event times bounded by the server's clock. A 422 for these alone is the
# API keeping its documented contract; any other refusal of schema-valid data still fails the run.
CROSS_PARAMETER_ERRORS = {
    ("user_id", "user_id or anonymous_id is required"),
    ("item_id", "required when context is product"),
}
CLOCK_FIELD = re.compile(r"\d+\.(ts|received_at)")  # "<index>.<field>" in a rejected batch
CLOCK_REASON = re.compile(r"is before |is in the future|is outside the years")


def _refused_for_a_rule_stated_in_words(body: dict[str, Any]) -> bool:
    errors = {(e["field"], e["reason"]) for e in body.get("errors", [])}
    if not errors:
        return False
    if body.get("error") == "events_rejected":
        return all(CLOCK_FIELD.fullmatch(field) and CLOCK_REASON.match(reason) for field, reason in errors)
    return errors <= CROSS_PARAMETER_ERRORS


def positive_data_acceptance(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' check, but for a 422 that only enforces a rule stated in words (above)."""
    if response.status_code == 422 and _refused_for_a_rule_stated_in_words(response.json()):
        return None
    return checks.positive_data_acceptance(ctx, response, case)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_every_route_keeps_its_openapi_promises(case: Any, api: tuple[str, dict[str, str]]) -> None:
    base_url, headers = api
    excluded: list[Any] = [checks.positive_data_acceptance]  # replaced by the one above
    if not headers:
        # Without keys auth is off by design (the embedded demo), while the routes declare their security
        # schemes for production: "ignored auth" is what this mode is. The secured run checks auth.
        excluded.append(checks.ignored_auth)
    case.call_and_validate(
        base_url=base_url, headers=headers, excluded_checks=excluded, additional_checks=[positive_data_acceptance]
    )
