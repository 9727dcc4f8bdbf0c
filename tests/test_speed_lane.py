"""The speed layer's lanes (speed_layer/sender.py): calls written together are answered one reply each, in order."""

from __future__ import annotations

import redis

from speed_layer.sender import lane_for


def test_calls_written_together_are_read_in_order_with_a_failed_one_in_place(any_redis: tuple[redis.Redis, str]) -> None:
    client, _ = any_redis
    client.set("lane:{t}:text", "x")
    client.hset("lane:{t}:hash", "category", "shoes")
    lane = lane_for(client)
    lane.send_all([
        ("HGET", "lane:{t}:hash", "category"),
        ("HGET", "lane:{t}:text", "category"),  # WRONGTYPE: its reply is the error, the others go on
        ("HGET", "lane:{t}:absent", "category"),
        ("MGET", "lane:{t}:text", "lane:{t}:absent"),
    ])  # fmt: skip
    lane.send("GET", "lane:{t}:text")  # a later call is read after them
    first, failed, absent, both = lane.read(4)
    assert (first, absent, both) == (b"shoes", None, [b"x", None])
    assert isinstance(failed, redis.ResponseError) and "WRONGTYPE" in str(failed)
    assert lane.read(1) == [b"x"] and lane.unread == 0
    lane.send_all([])  # nothing to write: nothing to read
    assert lane.unread == 0
