"""All Redis keys of one person hash to one Redis Cluster slot, so the same code runs on a cluster.

The slot is computed as Redis does (CRC16/XMODEM of the hash tag, mod 16384), checked against
redis-py's implementation, and then confirmed by a real redis-server started in cluster mode:
its own CLUSTER KEYSLOT, and a multi-key command that a cluster refuses across slots.
"""

from __future__ import annotations

import fnmatch
import inspect
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot as redis_py_key_slot

from common import redis_keys
from common.neighbours import session_token
from common.redis_server import free_cluster_port

SLOTS = 16384

# Odd ids on purpose: a brace, a colon, unicode and the empty string must not split a person's keys.
PEOPLE = ["u42", "anon-7f3c9e", "user:with:colons", "a}b", "a}:s:b", "{x}", "*?[]\\%", "ünïcode", "", "0" * 64]
# Values for the non-person parameters of key functions; the slot must not depend on them.
OTHER_ARGS = {
    "session_id": ["s1", "sess-{9}"],
    "event_id": ["e1", "ev:2"],
    "model_version": ["v1", "20250101T000000"],
    "part": ["seen", "recent:s:{1}"],
}


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as in Redis' crc16.c."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """Redis Cluster's HASH_SLOT: hash only the part between the first `{` and the next `}` if non-empty."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16_xmodem(raw) % SLOTS


def person_key_functions() -> list[tuple[str, Callable[..., str]]]:
    """Every public function of common.redis_keys that builds a key for one person."""
    found = []
    for name, fn in inspect.getmembers(redis_keys, inspect.isfunction):
        if name.startswith("_") or fn.__module__ != redis_keys.__name__ or name == "person_keys_match":
            continue  # (a pattern of the person's keys, not a key)
        signature = inspect.signature(fn)
        if "person_id" in signature.parameters and "client" not in signature.parameters:
            found.append((name, fn))  # (functions taking a client read Redis: they build no key)
    return found


def keys_of(person: str) -> dict[str, str]:
    """name -> key for every per-person key function, with each other parameter varied."""
    keys = {}
    for name, fn in person_key_functions():
        others = [p for p in inspect.signature(fn).parameters if p != "person_id"]
        missing = [p for p in others if p not in OTHER_ARGS]
        assert not missing, f"{name}: add sample values for {missing} to OTHER_ARGS"
        for variant in range(2):
            kwargs = {p: OTHER_ARGS[p][variant] for p in others}
            keys[f"{name}#{variant}"] = fn(person_id=person, **kwargs)
    return keys


def test_crc16_matches_redis_reference_values():
    # Reference values: the CRC16/XMODEM check value, and slots from the Redis Cluster spec and docs.
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("foo") == 12182
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % SLOTS  # empty tag: whole key hashed
    assert key_slot("foo{{bar}}zap") == crc16_xmodem(b"{bar") % SLOTS
    for key in ["", "a", "lr:{u:1}:items", "{}", "x{y}z", "ünï{cödé}"]:
        assert key_slot(key) == redis_py_key_slot(key.encode())


def test_the_module_has_per_person_keys_to_check():
    # Guards against a vacuous pass if the key functions are renamed away from `person_id`.
    names = {name for name, _ in person_key_functions()}
    assert {"session_recent", "person_items", "user_delta", "seen_events"} <= names
    assert len(names) >= 8


@pytest.mark.parametrize("person", PEOPLE)
def test_all_keys_of_one_person_share_one_slot(person: str):
    keys = keys_of(person)
    slots = {name: key_slot(key) for name, key in keys.items()}
    assert len(set(slots.values())) == 1, f"keys of {person!r} spread over slots: {slots}"
    for key in keys.values():  # and the pattern erasure scans with finds each of them
        assert fnmatch.fnmatchcase(key, redis_keys.person_keys_match(person)), f"{key!r} lacks the person's tag"


def test_different_people_spread_over_slots():
    # The tag must carry the person id, not a constant: otherwise every user lands on one node.
    slots = {key_slot(redis_keys.person_items(f"user-{i}")) for i in range(1000)}
    assert len(slots) > 900


# ---------------------------------------------------------------- a real redis-server in cluster mode


def _start_cluster_node(binary: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    """Start redis-server in cluster mode on a free port; retry on a new port if one is taken meanwhile."""
    for attempt in range(3):
        port = free_cluster_port()
        node_dir = data_dir / f"try{attempt}"
        node_dir.mkdir()
        # Not daemonized, so the fixture owns the process and ends exactly it.
        proc = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--logfile", str(node_dir / "redis.log"),
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--save", "",
                "--appendonly", "no",
            ],
        )  # fmt: skip
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                return proc, client
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
    log = (node_dir / "redis.log").read_text(errors="replace")[-2000:]
    pytest.fail(f"redis-server in cluster mode did not start:\n{log}")


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A one-node Redis Cluster owning all 16384 slots, so cross-slot rules are enforced for real."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    proc, client = _start_cluster_node(binary, tmp_path_factory.mktemp("redis-cluster"))
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1)
        deadline = time.monotonic() + 30
        while "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("the one-node cluster never reached cluster_state:ok")
            time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("person", PEOPLE)
def test_redis_cluster_keyslot_agrees(cluster_node: redis.Redis, person: str):
    for name, key in keys_of(person).items():
        assert cluster_node.execute_command("CLUSTER", "KEYSLOT", key) == key_slot(key), name


def test_cluster_accepts_multi_key_commands_on_one_person(cluster_node: redis.Redis):
    # What the speed layer relies on: one MULTI/Lua step may touch all of a person's keys.
    keys = list(keys_of("u42").values())
    assert cluster_node.exists(*keys) == 0
    script = "for i, k in ipairs(KEYS) do redis.call('SET', k, i) end return #KEYS"
    assert cluster_node.eval(script, len(keys), *keys) == len(keys)
    assert cluster_node.exists(*keys) == len(keys)


def test_cluster_refuses_multi_key_commands_across_people(cluster_node: redis.Redis):
    # The control: the check above is meaningful only because the node enforces slots.
    one, other = redis_keys.person_items("u42"), redis_keys.person_items("u43")
    assert key_slot(one) != key_slot(other)
    with pytest.raises(redis.ResponseError, match="same slot"):
        cluster_node.exists(one, other)


# ---------------------------------------------------------------- slot groups of the keys of no person

IDS = ["i1", "item:with:colons", "a}b", "{x}", "ünïcode", "", "0" * 64, "shoes/running"]
# Each family named by its own id, and the id the group is computed from.
GROUPED: dict[str, Callable[[str], str]] = {
    "covisitation": redis_keys.covisitation,
    "sorted_covisitation": redis_keys.sorted_covisitation,  # the same slot as covisitation's: converted in one script
    "float_covisitation": redis_keys.float_covisitation,  # the same slot as sorted_covisitation's, likewise
    "item_sessions": redis_keys.item_sessions,
    "item_state": redis_keys.item_state,
    "category_bestsellers": redis_keys.category_bestsellers,
    "popularity_days": lambda day: redis_keys.popularity_day(int(day) if day.isdigit() else 20000),
}
# Keys used together: one group each.
TOGETHER = {
    "trend": [redis_keys.TRENDING_TOP, redis_keys.TRENDING_TOP_TOKEN, redis_keys.TRENDING_REFRESH_LOCK]
    + [redis_keys.TRENDING_VERSIONS]
    + [redis_keys.trending_bucket(start) for start in (0, 300, 1_800_000_000)],
    "item flags": [redis_keys.OUT_OF_STOCK, redis_keys.PROMOTED],
    "bookkeeping": [redis_keys.SPEED_VERSION, redis_keys.SPEED_PENDING_VERSION, redis_keys.SPEED_HEARTBEAT]
    + [redis_keys.SPEED_MIGRATED]
    + [redis_keys.speed_rebuild_lock("v1"), redis_keys.speed_rebuild_marker("v2")],
    # count_impressions.lua acknowledges a stream entry and counts it in the experiment's hash in one call;
    # apply_globals.lua counts a served list's reward in the hash its record names.
    "bandit": [redis_keys.BANDIT_IMPRESSIONS, redis_keys.bandit_served("r1"), redis_keys.bandit_served("{x}")]
    + [redis_keys.bandit_counts(experiment, version) for experiment in ("home", "pdp") for version in ("a1", "b2")],
}


@pytest.mark.parametrize("family", sorted(GROUPED))
@pytest.mark.parametrize("key_id", IDS)
def test_a_global_key_is_in_the_slot_group_of_its_own_id(family: str, key_id: str) -> None:
    key = GROUPED[family](key_id)
    assert redis_keys.family_of(key) == family
    group = redis_keys.group_of_key(key)
    named_by = key_id if family != "popularity_days" else str(int(key_id) if key_id.isdigit() else 20000)
    assert group == redis_keys.slot_group(named_by)
    assert key_slot(key) == key_slot(f"{{g:{group}}}")  # the tag decides the slot, whatever the id holds


@pytest.mark.parametrize("name", sorted(TOGETHER))
def test_keys_used_together_share_one_group(name: str) -> None:
    groups = {redis_keys.group_of_key(key) for key in TOGETHER[name]}
    assert len(groups) == 1 and None not in groups, groups
    assert len({key_slot(key) for key in TOGETHER[name]}) == 1


def test_every_grouped_family_is_checked_and_the_groups_spread():
    # Guards against a new global family outside this test: every family whose keys carry a group tag.
    tagged = {f.name for f in redis_keys.FAMILIES if any(p.startswith(f"{redis_keys.PREFIX}:{{g:") for p in f.patterns)}
    assert tagged == set(GROUPED) | {
        "group_seen", "trending_top", "trending_buckets", "speed_bookkeeping", "bandit_impressions", "bandit_counts",
        "bandit_served", "drift_sample", "neighbour_sessions",  # the last grouped by its token (below)
    }
    groups = {redis_keys.slot_group(f"i{j}") for j in range(1000)}
    assert groups == set(range(redis_keys.SLOT_GROUPS))
    assert len({key_slot(redis_keys.group_seen(g)) for g in groups}) == redis_keys.SLOT_GROUPS


def test_lua_computes_the_slot_group_as_python_does(cluster_node: redis.Redis):
    # The scripts build grouped keys from templates (redis_keys.grouped_template) with this expression.
    script = "return tonumber(string.sub(redis.sha1hex(ARGV[1]), 1, 8), 16) % tonumber(ARGV[2])"
    for key_id in IDS:
        assert cluster_node.eval(script, 0, key_id, redis_keys.SLOT_GROUPS) == redis_keys.slot_group(key_id)
        head, middle, suffix = redis_keys.grouped_template(redis_keys.covisitation)
        assert f"{head}{redis_keys.slot_group(key_id)}{middle}{key_id}{suffix}" == redis_keys.covisitation(key_id)


TOKENS = [session_token(person, session) for person in ("u1", "anon-9", "ünï") for session in ("s1", "s2")]


def test_a_session_token_key_is_in_the_slot_group_of_its_own_digits(cluster_node: redis.Redis):
    # The scripts build these keys with this expression: a token is hex digits of a SHA-1 already.
    script = "return tonumber(string.sub(ARGV[1], 1, 8), 16) % tonumber(ARGV[2])"
    for token in TOKENS:
        key = redis_keys.neighbour_session(token)
        assert redis_keys.family_of(key) == "neighbour_sessions"
        assert redis_keys.group_of_key(key) == redis_keys.token_group(token) == int(token[:8], 16) % redis_keys.SLOT_GROUPS
        assert cluster_node.eval(script, 0, token, redis_keys.SLOT_GROUPS) == redis_keys.token_group(token)
        head, middle, suffix = redis_keys.grouped_template(redis_keys.neighbour_session)
        assert f"{head}{redis_keys.token_group(token)}{middle}{token}{suffix}" == key
        assert key_slot(key) == key_slot(f"{{g:{redis_keys.token_group(token)}}}")
    spread = {redis_keys.token_group(session_token(f"p{j}", "s")) for j in range(1000)}
    assert spread == set(range(redis_keys.SLOT_GROUPS))
