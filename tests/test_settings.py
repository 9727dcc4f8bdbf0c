"""Settings: nested RECS_* variables, unknown keys refused by name, bad values explained, secrets never printed."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from common.settings import SettingsError, get_settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECS_"):
            monkeypatch.delenv(name)


def test_nested_sections_read_from_double_underscore_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_REDIS__URL", "redis://cache:6379/2")
    monkeypatch.setenv("RECS_API__PORT", "9001")
    monkeypatch.setenv("RECS_LAKE__ROOT", "s3://bucket/lake")
    monkeypatch.setenv("RECS_TRAINING__FACTORS", "16")
    settings = load_settings()
    assert settings.redis.effective_url == "redis://cache:6379/2"
    assert settings.api.port == 9001
    assert settings.lake.root == "s3://bucket/lake"
    assert settings.training.factors == 16
    assert settings.spark.master == "local[*]"  # untouched sections keep their defaults


def test_unknown_keys_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_REDIS__ULR", "redis://typo")
    monkeypatch.setenv("RECS_LAKEROOT", "/tmp/x")
    with pytest.raises(SettingsError, match="RECS_LAKEROOT, RECS_REDIS__ULR"):
        load_settings()


def test_a_nested_key_under_a_plain_value_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_API__PORT__X", "1")
    with pytest.raises(SettingsError, match="RECS_API__PORT__X"):
        load_settings()


def test_bad_values_name_the_variable_and_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_API__PORT", "eighty")
    with pytest.raises(SettingsError, match=r"RECS_API__PORT: Input should be a valid integer"):
        load_settings()


def test_cross_field_rules_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_EXPERIMENTS__SHARES", '{"a": 0.5, "b": 0.2}')
    monkeypatch.setenv("RECS_EXPERIMENTS__CONTROL", "a")
    with pytest.raises(SettingsError, match="shares must add up to 1, got 0.7"):
        load_settings()


def test_retention_below_two_days_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECS_REDIS__RETENTION_HOURS", "12")
    with pytest.raises(SettingsError, match="RECS_REDIS__RETENTION_HOURS"):
        load_settings()


def test_recs_config_prints_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from recs.main import app

    secrets = {
        "RECS_REDIS__URL": "redis://admin:redis-pass-1@cache.example:6379/0?password=query-pass-2",
        "RECS_API__KEYS": json.dumps({"key-storefront-0001": ["events:write"], "key-reader-0002": ["recs:read"]}),
        "RECS_SPARK__CONF": json.dumps({"spark.hadoop.fs.s3a.secret.key": "s3-secret-3", "spark.driver.host": "h1"}),
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["config"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    for secret in ("redis-pass-1", "query-pass-2", "key-storefront", "key-reader", "s3-secret-3"):
        assert secret not in result.output
    printed = json.loads(result.output)
    assert printed["redis"]["url"] == "redis://admin:***@cache.example:6379/0?password=***"
    assert printed["api"]["keys"] == ["***0001: events:write", "***0002: recs:read"]  # told apart, scopes shown
    assert printed["spark"]["conf"] == {"spark.hadoop.fs.s3a.secret.key": "***", "spark.driver.host": "h1"}
