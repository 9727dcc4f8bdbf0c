"""The Lua scripts' declared KEYS/ARGV layout (common/lua.py) against what Python sends: every real call
matches its file's header, and a drift either way is an error raised before the script runs."""

from __future__ import annotations

import fnmatch
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from common.events import EventType
from common.lua import LayoutError, Script, load_script
from common.model import load_model
from common.registry import Registry
from common.speed_state import READ_FLAGS, READ_STATE, READ_TRENDING, read_speed_state
from common.stream import REMOVE_IDLE_CONSUMERS, TRIM_STREAM
from speed_layer import effects
from speed_layer.bandit import COUNT_IMPRESSIONS
from speed_layer.effects import Applier
from speed_layer.migrations import CONVERT_COVISITS, CONVERT_SORTED_COVISITS, CONVERT_TIMES
from speed_layer.scripts import APPLY_EVENTS, APPLY_GLOBALS, DETACH_DEVICE, MERGE_IDENTITY
from tests.speed_factories import make_event, publish_model, speed_settings

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = (
    APPLY_EVENTS, APPLY_GLOBALS, MERGE_IDENTITY, DETACH_DEVICE, READ_STATE, READ_FLAGS, READ_TRENDING, TRIM_STREAM, REMOVE_IDLE_CONSUMERS, COUNT_IMPRESSIONS,
    CONVERT_COVISITS, CONVERT_SORTED_COVISITS, CONVERT_TIMES,
)

HEADER = """-- A test script.
-- KEYS: first block*n
-- KEYS block: a b
--    c
-- ARGV: n label item*n
redis.call('SET', KEYS[1], ARGV[2])
"""


def test_every_lua_file_is_package_data_and_loads_into_redis(redis_client: redis.Redis) -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = sorted(p.relative_to(ROOT) for p in ROOT.glob("*/*.lua"))
    assert {f.name for f in files} == {s.name for s in SCRIPTS}  # every file is loaded by a module
    for path in files:  # an installed package ships them
        package, name = path.parts
        assert any(fnmatch.fnmatch(name, pattern) for pattern in package_data.get(package, [])), path
    for script in SCRIPTS:
        assert redis_client.script_load(script.source) == script.sha


def test_sizes_come_from_the_declaration() -> None:
    script = Script("t.lua", HEADER)
    assert script.keys.size({"n": 3}) == 1 + 3 * 3  # the continuation line adds `c` to the block
    assert script.argv.size({"n": 3}) == 2 + 3
    assert script.source.startswith("local KEYS_HEAD, KEYS_BLOCK, ARGV_HEAD = 1, 3, 2; local KEYS, ARGV, redis, ")
    # All on the file's first line: Redis' error line numbers stay the file's.
    assert script.source.endswith(HEADER) and script.source.count("\n") == HEADER.count("\n")
    # The speed scripts' constants, as the Lua reads them.
    assert APPLY_EVENTS.argv.lua_sizes() == {
        "ARGV_HEAD": 32, "ARGV_HOLDER": 3, "ARGV_EVENT": 13, "ARGV_PER_VERSION": 2
    }  # fmt: skip
    assert APPLY_EVENTS.keys.size({"holder_count": 1, "event_count": 2, "n_versions": 1}) == 1 + (10 + 2) + 2 * 3
    assert MERGE_IDENTITY.keys.lua_sizes() == {"KEYS_HEAD": 12, "KEYS_SESSION": 10}


def test_a_call_is_checked_against_the_counts_it_carries() -> None:
    script = Script("t.lua", HEADER)
    block = script.keys.packer("block")
    keys = script.keys.pack(first="k", block=[*block(a="a1", b="b1", c="c1"), *block(c="c2", b="b2", a="a2")])
    assert keys == ["k", "a1", "b1", "c1", "a2", "b2", "c2"]  # declared order, whatever the call's
    args = script.argv.pack(n=2, label="x", item=["p", "q"])
    script.check(keys, args)
    with pytest.raises(LayoutError, match=r"t.lua: KEYS has 7 values, the declaration 10 \(n=3\)"):
        script.check(keys, script.argv.pack(n=3, label="x", item=["p", "q", "r"]))
    with pytest.raises(LayoutError, match="t.lua: ARGV has 5 values, the declaration 4"):
        script.check(keys, [*args, "extra"])


def test_a_declared_name_without_a_value_or_a_value_without_a_name_is_refused() -> None:
    block = Script("t.lua", HEADER).keys.packer("block")
    with pytest.raises(
        TypeError, match=r"t.lua KEYS block\(\) missing 1 required keyword-only argument: 'c'"
    ):
        block(a="a", b="b")
    with pytest.raises(TypeError, match=r"t.lua KEYS block\(\) got an unexpected keyword argument 'd'"):
        block(a="a", b="b", c="c", d="d")


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("-- KEYS: a b*n c\n", "'c' follows a repetition"),
        ("-- KEYS: a\n-- KEYS g: x\n", "KEYS g is declared but never repeated"),
        ("-- KEYS: a a\n", "a name is declared twice"),
        ("-- ARGV: a class\n", "'class' is not a usable name"),
        ("-- no layout here\n", "declares no KEYS and no ARGV"),
    ],
)
def test_a_malformed_header_is_refused_at_load(header: str, problem: str) -> None:
    with pytest.raises(LayoutError, match=problem):
        Script("t.lua", header + "return 1\n")


def test_the_speed_and_read_scripts_send_what_they_declare(redis_client: redis.Redis, tmp_path: Path) -> None:
    """Two versions' deltas, an identify's merge and serving's read, through the checked calls."""
    settings = speed_settings(tmp_path, "redis://unused")
    registry = Registry(settings.models.root)
    items = np.random.default_rng(0).normal(0, 0.1, size=(5, 4)).astype(np.float32)
    for version in ("v1", "v2"):
        publish_model(registry, version, datetime.now(UTC) - timedelta(hours=1), items, ["u1"])
    models = [load_model(registry, "v1"), load_model(registry, "v2")]
    applier = Applier(redis_client, settings)
    events = [
        make_event(EventType.VIEW, "i1", anonymous_id="d1", session_id="s1"),
        make_event(EventType.IDENTIFY, None, anonymous_id="d1", user_id="u1", session_id="s1"),
        make_event(EventType.ADD_TO_CART, "i2", anonymous_id="d1", user_id="u1", session_id="s1", quantity=2),
    ]
    result = applier.apply(events, models)
    assert (result.applied, result.failed) == (3, {})
    state = read_speed_state(redis_client, "u1", session_id="s1", model_version="v2", categories=["c1"])
    assert state.cart == {"i2": 2} and state.delta_events == 1


def test_a_drifted_layout_fails_before_the_script_runs(
    redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Lua declares a value Python does not send: the call is refused, Redis never runs the script."""
    text = (ROOT / "speed_layer" / "apply_events.lua").read_text()
    drifted = Script(
        "apply_events.lua", text.replace("-- ARGV event: holder", "-- ARGV event: channel holder")
    )
    monkeypatch.setattr(effects, "_EVENT_ARGS", drifted.argv.packer("event"))
    applier = Applier(redis_client, speed_settings(tmp_path, "redis://unused"))
    redis_client.config_resetstat()
    with pytest.raises(TypeError, match="apply_events.lua ARGV event.*'channel'"):
        applier.apply([make_event(EventType.VIEW, "i1")], [])
    assert "cmdstat_evalsha" not in redis_client.info("commandstats")
    assert redis_client.dbsize() == 0


def test_load_script_reads_package_data() -> None:
    assert load_script("speed_layer", "apply_events.lua").sha == APPLY_EVENTS.sha
