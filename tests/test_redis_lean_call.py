"""`lean_call`: the request path's commands without redis-py's per-call work, answering as execute_command does."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.exceptions import NoScriptError

from common.redis_server import RedisServer, connect, free_port, lean_call

SCRIPT = "return {redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), ARGV[1], tonumber(ARGV[2]) + 1, {false}}"


Z, H = "{t}z", "{t}h"  # one slot, so a cluster takes the multi-key calls too


def _fill(client: redis.Redis) -> None:
    client.zadd(Z, {"a": 1.0, "b": 2.5, "é": 1e-7, "c": 232792560})
    client.hset(H, mapping={"f": "v"})


def test_replies_equal_execute_commands(any_redis: tuple[redis.Redis, str]) -> None:
    client, _ = any_redis
    _fill(client)
    sha = client.script_load(SCRIPT)
    calls = [
        ("ZMSCORE", Z, "a", "missing", "é", "c"),  # absent members are None
        ("ZRANGE", Z, 0, -1, "WITHSCORES"),
        ("HGETALL", H),
        ("EVALSHA_RO", sha, 1, Z, "text", 41),
        ("EVAL_RO", SCRIPT, 1, Z, b"\x00bytes", 1.5),  # bytes and a float argument, packed as redis-py does
        ("MGET", H, "{t}nothing"),  # a wrong type in MGET is nil, not an error
    ]
    for call in calls:
        assert lean_call(client, *call) == client.execute_command(*call), call
    assert lean_call(client, "ZMSCORE", Z, "a", "missing") == [1.0, None]


def test_an_error_reply_is_raised_and_the_connection_stays_usable(redis_client: redis.Redis) -> None:
    _fill(redis_client)
    with pytest.raises(NoScriptError):  # as serving's read expects when a restarted Redis forgot the script
        lean_call(redis_client, "EVALSHA_RO", "0" * 40, 0)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        lean_call(redis_client, "ZMSCORE", H, "a")
    # The pool has one idle connection, which answered both errors: nothing is left unread on it.
    assert len(redis_client.connection_pool._available_connections) == 1
    assert lean_call(redis_client, "ZMSCORE", Z, "b") == [2.5]
    assert lean_call(redis_client, "HGETALL", H) == {b"f": b"v"}


def test_a_killed_connection_is_reopened_and_the_command_answered(redis_client: redis.Redis) -> None:
    _fill(redis_client)
    assert lean_call(redis_client, "ZMSCORE", Z, "a") == [1.0]
    pooled = redis_client.connection_pool._available_connections[0]
    pooled_id = lean_call(redis_client, "CLIENT", "ID")
    killer = redis.Redis(connection_pool=redis.ConnectionPool(**redis_client.connection_pool.connection_kwargs))
    assert killer.client_kill_filter(_id=pooled_id) == 1
    killer.close()
    assert lean_call(redis_client, "ZMSCORE", Z, "a", "b") == [1.0, 2.5]
    assert redis_client.connection_pool._available_connections == [pooled]  # the same connection, reconnected
    assert lean_call(redis_client, "CLIENT", "ID") != pooled_id


def test_redis_down_raises_a_connection_error(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    server.start()
    client = connect(server.url)
    assert lean_call(client, "PING") is True
    server.kill()
    try:
        with pytest.raises(redis.ConnectionError):  # what serving catches to degrade
            lean_call(client, "ZMSCORE", Z, "a")
    finally:
        client.close()
        server.stop()

