"""Real process kills: a dead consumer's pending entries are claimed and it leaves its group; the lake
writer survives kill -9; `recs speed run --consumers N` restarts a killed child."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis

from common import redis_keys
from common.events import EventType
from common.lake import Lake
from common.redis_server import RedisServer
from common.speed_state import read_speed_state
from common.stream import group_lag, remove_idle_consumers
from speed_layer.consumer import SpeedConsumer
from speed_layer.lake_writer import LakeWriter
from speed_layer.supervisor import supervise
from tests.conftest import process_gone
from tests.speed_factories import add_events, make_event, speed_settings

ROOT = Path(__file__).resolve().parents[1]

# Reads one batch as the real consumer does, then hangs as if stuck mid-batch until it is killed.
VICTIM = """
import sys, time
from common.redis_server import connect
from tests.speed_factories import speed_settings
from speed_layer.consumer import SpeedConsumer
from pathlib import Path
settings = speed_settings(Path(sys.argv[2]), sys.argv[1])
consumer = SpeedConsumer(connect(sys.argv[1], timeout_s=5), settings, name="victim")
entries, _ = consumer._read(block=True)
print(len(entries), flush=True)
time.sleep(60)
"""

# The same for the lake writer's group.
LAKE_VICTIM = """
import sys, time
from common.redis_server import connect
from tests.speed_factories import speed_settings
from speed_layer.lake_writer import LakeWriter
from pathlib import Path
settings = speed_settings(Path(sys.argv[2]), sys.argv[1])
writer = LakeWriter(connect(sys.argv[1], timeout_s=5), settings, name="lake-victim")
print(len(writer._read(100, 2000)), flush=True)
time.sleep(60)
"""


def _members(client: redis.Redis, group: str) -> dict[str, int]:
    """Member name -> pending entries, as XINFO CONSUMERS says."""
    return {c["name"].decode(): c["pending"] for c in client.xinfo_consumers(redis_keys.stream(), group)}


def _start_victims(url: str, tmp_path: Path) -> list[subprocess.Popen[str]]:
    """A speed consumer and a lake writer that each read the stream's entries, then hang until killed."""
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, url, str(tmp_path)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        for script in (VICTIM, LAKE_VICTIM)
    ]


@pytest.mark.slow
def test_a_killed_member_leaves_its_group_once_its_entries_are_claimed(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url, dead_consumer_idle_ms=300)
    speed, lake_group, stream = settings.speed.group, settings.speed.lake_group, redis_keys.stream()
    events = [make_event(EventType.VIEW, f"i{j}", anonymous_id="a1") for j in range(5)]
    add_events(redis_client, settings, events)
    victims = _start_victims(redis_server.url, tmp_path)
    try:
        assert [v.stdout.readline().strip() for v in victims if v.stdout] == ["5", "5"]
    finally:
        for victim in victims:
            victim.send_signal(signal.SIGKILL)
            victim.wait()
    redis_client.hset(redis_keys.SPEED_HEARTBEAT, "victim", 0)  # its beats before it hung
    assert _members(redis_client, speed) == {"victim": 5}
    assert _members(redis_client, lake_group) == {"lake-victim": 5}
    # Holding entries, a member stays however long it has been idle.
    assert remove_idle_consumers(redis_client, stream, speed, 0, "nobody") == []
    assert remove_idle_consumers(redis_client, stream, lake_group, 0, "nobody") == []

    survivor = SpeedConsumer(redis_client, settings, name="survivor")
    writer = LakeWriter(redis_client, settings, name="lake-survivor")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        set(_members(redis_client, speed)) != {"survivor"}
        or set(_members(redis_client, lake_group)) != {"lake-survivor"}
    ):
        survivor.poll_once(block=False)
        writer.poll_once()
        time.sleep(0.05)
    writer.flush()

    assert _members(redis_client, speed) == {"survivor": 0}
    assert _members(redis_client, lake_group) == {"lake-survivor": 0}
    assert b"victim" not in redis_client.hgetall(redis_keys.SPEED_HEARTBEAT)
    assert read_speed_state(redis_client, "a1", session_id="s1").session_counts == {"view": 5}
    assert Lake(settings.lake.root).read_events(columns=["event_id"]).num_rows == 5


def test_killed_consumer_pending_entries_are_claimed_and_applied(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    events = [make_event(EventType.VIEW, f"i{j}", anonymous_id="a1") for j in range(5)]
    add_events(redis_client, settings, events)
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, redis_server.url, str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "5"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    pending = redis_client.xpending(redis_keys.stream(), settings.speed.group)
    assert pending["pending"] == 5 and pending["consumers"][0]["name"] == b"victim"

    survivor = SpeedConsumer(redis_client, settings, name="survivor")
    deadline = time.monotonic() + 10
    while (
        redis_client.xpending(redis_keys.stream(), settings.speed.group)["pending"]
        and time.monotonic() < deadline
    ):
        survivor.poll_once(block=False)
        time.sleep(0.05)
    state = read_speed_state(redis_client, "a1", session_id="s1")
    assert state.session_counts == {"view": 5}
    assert set(state.session_items) == {f"i{j}" for j in range(5)}


def test_lake_writer_survives_kill_9_without_loss_or_duplicates(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RECS_REDIS__URL": redis_server.url,
        "RECS_LAKE__ROOT": settings.lake.root,
        "RECS_LAKE__FLUSH_EVENTS": "40",
        "RECS_LAKE__FLUSH_SECONDS": "0.1",
        "RECS_SPEED__CLAIM_IDLE_MS": "200",
        "RECS_SPEED__CLAIM_INTERVAL_S": "0.1",
    }
    command = [sys.executable, "-c", "from speed_layer.cli import lake_writer_run; lake_writer_run()"]
    lake = Lake(settings.lake.root)
    rng = random.Random(5)
    sent: list[str] = []

    def send(n: int) -> None:
        batch = [
            make_event(EventType.VIEW, f"i{rng.randrange(50)}", anonymous_id=f"a{len(sent) + j}")
            for j in range(n)
        ]
        add_events(redis_client, settings, batch)
        sent.extend(e.event_id for e in batch)

    for _round in range(2):
        writer = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        landed_before = lake.read_events(columns=["event_id"]).num_rows
        deadline = time.monotonic() + 20
        while (
            lake.read_events(columns=["event_id"]).num_rows == landed_before and time.monotonic() < deadline
        ):
            send(10)  # until the writer is up and has landed a file
            time.sleep(0.02)
        kill_at = time.monotonic() + rng.uniform(0.05, 0.4)
        while time.monotonic() < kill_at:
            send(10)
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)  # at whatever point it has reached: mid-write, mid-ack, idle
        writer.wait()

    final = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while (
            group_lag(redis_client, settings.redis.stream, settings.speed.lake_group)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(timeout=10)
    assert group_lag(redis_client, settings.redis.stream, settings.speed.lake_group) == 0
    landed = lake.read_events(columns=["event_id"])["event_id"].to_pylist()
    assert len(landed) == len(set(landed))  # no duplicate
    assert sorted(landed) == sorted(sent)  # no loss


def _consumer_children(parent: psutil.Process) -> set[int]:
    """Pids of the supervisor's live consumer processes (multiprocessing's helper processes left out)."""
    pids = set()
    for child in parent.children():
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:  # gone, or a zombie not reaped yet
            continue
        if "spawn_main" in line and "resource_tracker" not in line:
            pids.add(child.pid)
    return pids


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_speed_run_restarts_a_killed_child_and_sigterm_stops_all(
    redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RECS_VAR_DIR": str(tmp_path),
        "RECS_REDIS__URL": redis_server.url,
        "RECS_SPEED__BLOCK_MS": "10",
        "RECS_SPEED__CLAIM_IDLE_MS": "200",
        "RECS_SPEED__CLAIM_INTERVAL_S": "0.1",
        "RECS_SPEED__RESTART_BACKOFF_S": "0.1",
    }
    command = [sys.executable, "-c", "from recs.main import app; app()", "speed", "run", "--consumers", "2"]
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        events = [make_event(EventType.VIEW, f"i{(sent + j) % 7}", anonymous_id="a1") for j in range(n)]
        add_events(redis_client, settings, events)
        sent += n

    def applied() -> int:
        return read_speed_state(redis_client, "a1", session_id="s1").session_counts.get("view", 0)

    supervisor = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    parent = psutil.Process(supervisor.pid)
    try:
        _wait_for(lambda: len(_consumer_children(parent)) == 2, 30, "two consumers")
        first = _consumer_children(parent)
        send(20)
        _wait_for(lambda: applied() == sent, 30, "the first events")

        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(_consumer_children(parent) - first) == 1, 30, "a new consumer")
        assert supervisor.poll() is None  # the supervisor lives on
        send(20)
        _wait_for(lambda: applied() == sent, 30, "the events after the kill")

        children = _consumer_children(parent)
        assert victim not in children and len(children) == 2
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert all(process_gone(pid) for pid in children)
    finally:
        if supervisor.poll() is None:
            for child in parent.children(recursive=True):
                child.kill()
            supervisor.kill()
            supervisor.wait()


def _die_at_once() -> None:
    sys.exit(3)


def test_a_crash_loop_stops_after_the_bounded_restarts() -> None:
    context = multiprocessing.get_context("fork")
    made: list[multiprocessing.Process] = []

    def make(i: int) -> multiprocessing.Process:
        made.append(context.Process(target=_die_at_once))
        return made[-1]

    exited: list[int] = []
    code = supervise(
        make, 2, threading.Event(), restarts_per_minute=3, backoff_s=0.01, poll_s=0.01, on_exit=exited.append
    )

    assert code == 1
    assert len(made) == 2 + 3  # the first two, then three restarts within the minute
    # Each died on its own, but the last one may still have been starting when the bound stopped
    # everything: then it was terminated.
    assert all(p.exitcode == 3 for p in made[:-1])
    assert made[-1].exitcode in (3, -signal.SIGTERM)
    assert sorted(exited) == sorted(p.pid for p in made)  # each dead child reported once (its live gauges dropped)
