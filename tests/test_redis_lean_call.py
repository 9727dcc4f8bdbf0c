"""`lean_pipeline`: the request path's commands without redis-py's per-call work, answering as execute_command
(one command) and a pipeline (several) do."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoScriptError

from common.redis_server import RedisServer, connect, free_port, lean_pipeline


def lean_call(client: redis.Redis, *args: str | bytes | int | float) -> Any:
    """One command through `lean_pipeline`, as serving sends its read."""
    return lean_pipeline(client, [args])[0]


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



def _pipeline(client: redis.Redis, commands: list[tuple[str | int | float, ...]]) -> list[object]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return list(pipe.execute())


def test_a_lean_pipeline_answers_as_redis_pys(any_redis: tuple[redis.Redis, str]) -> None:
    client, _ = any_redis
    _fill(client)
    commands: list[tuple[str | int | float, ...]] = [
        ("ZMSCORE", Z, "a", "missing"),
        ("HGETALL", H),
        ("EVAL_RO", SCRIPT, 1, Z, "text", 41),
        ("XLEN", "{t}s"),
    ]
    assert lean_pipeline(client, commands) == _pipeline(client, commands)
    # Writes: the same stream entries through either path, in order (explicit ids: `*` would differ).
    ours = lean_pipeline(client, [("XADD", "{t}s", f"1-{i}", "e", "x") for i in range(1, 4)])
    theirs = _pipeline(client, [("XADD", "{t}s", f"2-{i}", "e", "x") for i in range(1, 4)])
    assert ours == [b"1-1", b"1-2", b"1-3"] and theirs == [b"2-1", b"2-2", b"2-3"]
    assert client.xlen("{t}s") == 6


def test_an_error_reply_in_a_lean_pipeline_is_raised_after_every_command_ran(redis_client: redis.Redis) -> None:
    _fill(redis_client)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        lean_pipeline(redis_client, [("XADD", "s", "1-1", "e", "x"), ("ZMSCORE", H, "a"), ("XADD", "s", "1-2", "e", "y")])
    assert redis_client.xlen("s") == 2, "as in a pipeline, the commands around the error ran"
    assert len(redis_client.connection_pool._available_connections) == 1
    assert lean_pipeline(redis_client, [("ZMSCORE", Z, "b"), ("HGETALL", H)]) == [[2.5], {b"f": b"v"}]


def test_a_connection_lost_mid_pipeline_sends_it_again_through_redis_py(redis_client: redis.Redis) -> None:
    """Killed while its first command blocks (the pool's own check cannot see it coming), the connection
    fails the read; redis-py's path then sends every command again on a new one."""
    pooled_id = lean_call(redis_client, "CLIENT", "ID")
    killer = redis.Redis(connection_pool=redis.ConnectionPool(**redis_client.connection_pool.connection_kwargs))
    kill = threading.Timer(0.1, killer.client_kill_filter, kwargs={"_id": pooled_id})
    kill.start()
    try:
        replies = lean_pipeline(redis_client, [("BLPOP", "nothing", 0.5), ("XADD", "s", "1-1", "e", "x")])
    finally:
        kill.join()
        killer.close()
    assert replies == [None, b"1-1"]
    assert redis_client.xlen("s") == 1, "the first send's XADD, queued behind the blocked BLPOP, never ran"
    assert lean_call(redis_client, "CLIENT", "ID") != pooled_id
