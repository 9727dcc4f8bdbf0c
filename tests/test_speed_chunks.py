"""The chunked effects script on a real redis-server: a chunk of events leaves exactly the state that
applying them one by one leaves; a failing event costs only itself; affinities decay forward."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.cluster import RedisCluster

from common import redis_keys
from common.events import Consent, Event, EventType
from common.model import ModelArtifacts, load_model
from common.redis_server import RedisServer, is_cluster
from common.registry import Registry
from common.sequence import follow_weights
from common.settings import SpeedSettings
from common.speed_state import read_speed_state
from common.stream import group_lag
from common.vectors import sgd_step
from speed_layer.consumer import SpeedConsumer
from speed_layer.effects import Applier, PersonKeys, chunk_size
from speed_layer.trending import EPOCH
from tests.speed_factories import (
    add_events,
    make_event,
    publish_model,
    set_categories,
    speed_settings,
    within_one_day,
)

ITEMS = 12


def _events(rng: np.random.Generator, n: int, declined: bool = False) -> list[Event]:
    """Interleaved sessions of three users and a guest, with popular items repeating; with `declined`, also
    a visitor who declined personalisation (counted in the aggregates only: a call's events of such
    visitors share one holder)."""
    start = datetime.now(UTC) - timedelta(minutes=10)
    kinds = [EventType.VIEW] * 6 + [EventType.CLICK, EventType.ADD_TO_CART, EventType.PURCHASE]
    people: list[tuple[str | None, str, Consent | None]] = [
        ("u1", "u1", None), ("u2", "u2", None), ("u3", "u3", None), (None, "guest", None),
    ]  # fmt: skip
    if declined:
        people.append((None, "anon", Consent.NONE))
    out = []
    for j in range(n):
        user, device, consent = people[int(rng.integers(len(people)))]
        out.append(
            make_event(
                kinds[int(rng.integers(len(kinds)))],
                f"i{min(ITEMS - 1, int(rng.zipf(1.5)) - 1)}",
                anonymous_id=device,
                user_id=user,
                session_id=f"s-{device}-{j // 25}",
                ts=start + timedelta(seconds=j),
                received_at=start + timedelta(seconds=j),
                **({"consent": consent} if consent else {}),
            )  # fmt: skip
        )
    return out


def _dump(client: redis.Redis) -> dict[str, object]:
    """Every key's value in comparable form (sorted sets and float hashes rounded)."""
    out: dict[str, object] = {}
    # A cluster client sends KEYS to one node unless told to ask every master.
    found = client.keys("*", target_nodes=RedisCluster.PRIMARIES) if is_cluster(client) else client.keys("*")  # type: ignore[call-arg]
    for key in sorted(k.decode() for k in found):
        kind = client.type(key).decode()
        if key.endswith(":seen") or key == redis_keys.SEEN_UNLINKED:  # dedup markers: which events, not when (scored by Redis' clock)
            out[key] = sorted(m.decode() for m in client.zrange(key, 0, -1))
        elif kind == "zset":
            out[key] = {m.decode(): Near(s) for m, s in client.zrange(key, 0, -1, withscores=True)}
            if key == redis_keys.TRENDING_VERSIONS:  # its epoch is a random number, one for each Redis
                out[key].pop(EPOCH, None)  # type: ignore[attr-defined]
        elif kind == "hash":
            out[key] = {f.decode(): _number_or_text(v) for f, v in client.hgetall(key).items()}
        elif key == redis_keys.TRENDING_TOP_TOKEN:  # a fresh random text at every re-sum: that it is there
            out[key] = "a token"
        elif ":delta:" in key and not key.endswith(":n"):
            out[key] = np.round(np.frombuffer(client.get(key), dtype="<f4"), 5).tolist()
        elif kind == "string":
            out[key] = client.get(key)
    return out


class Near(float):
    """A float equal to any within 1e-12 of it, relatively: summing the same increments in another order may
    differ in the last bits. (Rounding both to 12 digits failed when two sums fell either side of a boundary.)"""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float | int) and math.isclose(self, other, rel_tol=1e-12)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = float.__hash__


def _number_or_text(value: bytes) -> object:
    try:
        return Near(float(value))
    except ValueError:
        return value


def _calls(client: redis.Redis, command: str) -> int:
    """How many times Redis ran `command` (scripts' calls included) since the last CONFIG RESETSTAT."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {"calls": 0})["calls"])


def _publish_v1(tmp_path: Path, rng: np.random.Generator) -> ModelArtifacts:
    """Version v1, active: ITEMS items and users u1..u3 with random 8-factor vectors."""
    registry = Registry(str(tmp_path / "models"))
    publish_model(
        registry, "v1", datetime.now(UTC) - timedelta(hours=1), rng.normal(size=(ITEMS, 8)).astype(np.float32),
        ["u1", "u2", "u3"], rng.normal(size=(3, 8)).astype(np.float32),
    )  # fmt: skip
    return load_model(registry, "v1")


def test_a_backlogs_batches_go_in_larger_calls_than_a_live_rates() -> None:
    """Five calls a batch, at least script_chunk_min events a call and at most script_chunk."""
    speed = SpeedSettings()
    assert (speed.script_chunk, speed.script_chunk_min) == (100, 50)
    sizes = {events: chunk_size(events, speed) for events in (1, 20, 60, 250, 300, 500, 2000)}
    assert sizes == {1: 50, 20: 50, 60: 50, 250: 50, 300: 60, 500: 100, 2000: 100}
    assert chunk_size(500, speed.model_copy(update={"script_chunk": 7})) == 7  # the cap wins


def test_a_chunk_leaves_the_state_one_by_one_application_leaves(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    model = _publish_v1(tmp_path, rng)
    events = _events(rng, 120, declined=True)
    categories = {f"i{j}": f"c{j % 3}" for j in range(ITEMS)}
    now_s = events[-1].ts.timestamp()
    states = []
    # 100 events a call (a backlog's), 50 (a live rate's) and one; negatives off: the SGD steps are deterministic.
    for chunk, per_call in ((100, 120), (50, 120), (1, 1)):
        settings = speed_settings(tmp_path, redis_server.url, script_chunk=chunk, script_chunk_min=chunk, negatives=0)
        redis_client.flushall()
        set_categories(redis_client, categories)
        applier = Applier(redis_client, settings)
        if per_call == 1:  # key names remembered from earlier batches, and forgotten at a bound
            applier.person_keys = PersonKeys(max_size=2)
        for start in range(0, len(events), per_call):
            result = applier.apply(events[start : start + per_call], [model], now_s=now_s)
            assert not result.failed and not result.unresolved
        assert len(applier.person_keys.session) <= applier.person_keys.max_size + per_call
        states.append(_dump(redis_client))

    # Overlapped, as the consumer's loop runs: each batch planned while the ones before are in flight.
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=7, negatives=0)
    redis_client.flushall()
    set_categories(redis_client, categories)
    applier = Applier(redis_client, settings)
    started = [applier.start(events[start : start + 30], [model], now_s=now_s) for start in range(0, 120, 30)]
    assert len(applier.in_flight) == 4
    for batch in started:
        result = applier.finish(batch)
        assert not result.failed and not result.unresolved and result.applied == 30
    states.append(_dump(redis_client))

    chunked, chunked_by_50, one_by_one, overlapped = states
    assert chunked == chunked_by_50 == one_by_one == overlapped
    assert any(
        key.endswith(":delta:v1") or ":delta" in key for key in chunked
    )  # the comparison covered deltas
    assert any(redis_keys.family_of(key) == "covisitation" for key in chunked)


def test_vectorised_sgd_chains_a_persons_steps_like_single_steps(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    registry = Registry(str(tmp_path / "models"))
    items = rng.normal(size=(ITEMS, 8)).astype(np.float32)
    users = rng.normal(size=(1, 8)).astype(np.float32)
    publish_model(registry, "v1", datetime.now(UTC) - timedelta(hours=1), items, ["u1"], users)
    settings = speed_settings(tmp_path, redis_server.url, negatives=0)
    events = [make_event(EventType.VIEW, f"i{j}", anonymous_id="u1", user_id="u1") for j in (1, 4, 1, 7)]
    Applier(redis_client, settings).apply(events, [load_model(registry, "v1")])

    expected = np.zeros(8, dtype=np.float32)
    speed, alpha = settings.speed, settings.training.alpha
    for j in (1, 4, 1, 7):  # a view's weight is 1 (no dwell)
        expected = sgd_step(
            users[0], expected, items[j], np.zeros((0, 8), dtype=np.float32), 1.0 + alpha * 1.0,
            speed.learning_rate, speed.l2, speed.max_delta_norm,
        )  # fmt: skip
    stored = np.frombuffer(redis_client.get(redis_keys.user_delta("u1", "v1")), dtype="<f4")
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    assert int(redis_client.get(redis_keys.user_event_count("u1", "v1"))) == 4


def test_a_failing_event_is_reported_and_the_rest_of_its_chunk_still_applies_once(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=50)
    set_categories(redis_client, {"i1": "shoes", "i2": "hats", "i3": "bags"})
    redis_client.set(redis_keys.session_cart("bad", "s1"), "not a hash")  # HINCRBY on it raises WRONGTYPE
    events = [
        make_event(EventType.VIEW, "i1", anonymous_id="a"),
        make_event(EventType.ADD_TO_CART, "i2", anonymous_id="bad"),
        make_event(EventType.VIEW, "i3", anonymous_id="b"),
    ]
    result = Applier(redis_client, settings).apply(events, [])

    assert list(result.failed) == [1] and "WRONGTYPE" in result.failed[1]
    assert result.applied == 2 and not result.unresolved
    day = read_speed_state(redis_client, "a", session_id="s1", candidate_items=["i1", "i2", "i3"]).day_counts
    assert day[:, -1].tolist() == [1.0, 0.0, 1.0]  # the first event's deferred counters were written once
    again = Applier(redis_client, settings).apply([events[0], events[2]], [])
    assert again.duplicates == 2 and again.applied == 0


def test_session_affinity_weighs_a_half_life_older_event_half(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = speed_settings(tmp_path, redis_server.url)
    set_categories(redis_client, {"i1": "shoes", "i2": "hats"})
    half_life = timedelta(seconds=settings.speed.affinity_half_life_s)
    late = datetime.now(UTC) - timedelta(seconds=5)
    events = [  # out of order on purpose: the older event arrives second
        make_event(EventType.VIEW, "i2", anonymous_id="a", ts=late),
        make_event(EventType.VIEW, "i1", anonymous_id="a", ts=late - half_life),
    ]
    Applier(redis_client, settings).apply(events, [])
    affinity = read_speed_state(redis_client, "a", session_id="s1").category_affinity
    assert affinity["hats"] / affinity["shoes"] == pytest.approx(2.0, rel=1e-6)


def test_a_conflict_with_another_consumer_in_flight_is_retried_and_counts_every_event_once(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)
    registry = Registry(str(tmp_path / "models"))
    publish_model(
        registry, "v1", datetime.now(UTC) - timedelta(hours=1), rng.normal(size=(ITEMS, 8)).astype(np.float32),
        ["u1"], rng.normal(size=(1, 8)).astype(np.float32),
    )  # fmt: skip
    model = load_model(registry, "v1")
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=3)
    mine, other = Applier(redis_client, settings), Applier(redis_client, settings)
    views = [make_event(EventType.VIEW, f"i{j % ITEMS}", anonymous_id="u1", user_id="u1") for j in range(30)]

    first = mine.start(views[:10], [model])
    assert other.apply(views[10:20], [model]).applied == 10  # moves u1's delta under the batch in flight
    second = mine.start(views[20:], [model])  # planned on what `first` will leave: a guess that can fail
    results = [mine.finish(first), mine.finish(second)]

    assert [r.applied for r in results] == [10, 10] and not any(r.unresolved or r.failed for r in results)
    assert int(redis_client.get(redis_keys.user_event_count("u1", "v1"))) == 30
    marks = redis_client.zrange(redis_keys.seen_events("u1"), 0, -1)
    assert len(marks) == 60  # each event once for its base effects and once in v1's delta
    assert not mine.in_flight


def test_events_read_before_their_devices_login_are_kept_under_the_user(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The overlapped loop sends batch n+1's reads before batch n starts. When n logs a device in, n+1's
    events of the device go under the user as one batch at a time puts them (its alias read again), not
    under the device, whose keys the merge has left and where the user's redeliveries would not find
    their markers."""
    model = _publish_v1(tmp_path, np.random.default_rng(5))
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=3)
    login = [
        make_event(EventType.VIEW, "i1", anonymous_id="d1", session_id="s1"),
        make_event(EventType.IDENTIFY, anonymous_id="d1", user_id="u9", session_id="s1"),
    ]
    after = [make_event(EventType.VIEW, "i2", anonymous_id="d1", session_id="s1")]
    applier = Applier(redis_client, settings)
    states = [applier.read_state(batch, [model]) for batch in (login, after)]  # as `pump` sends them
    started = [applier.start(batch, [model], state=state) for batch, state in zip((login, after), states, strict=True)]
    assert [applier.finish(s).applied for s in started] == [2, 1]

    def counts(person: str) -> dict[bytes, bytes]:
        return redis_client.hgetall(redis_keys.session_counts(person, "s1"))

    assert counts("u9") == {b"view": b"2"} and counts("d1") == {}
    assert redis_client.zscore(redis_keys.seen_events("u9"), after[0].event_id) is not None


def test_the_overlapped_loop_leaves_the_state_one_batch_at_a_time_leaves(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """`pump` (reads sent a step ahead, batches in flight) against `poll_once` (one batch at a time)."""
    rng = np.random.default_rng(11)
    _publish_v1(tmp_path, rng)
    events = _events(rng, 150, declined=True)
    settings = speed_settings(tmp_path, redis_server.url, batch_size=7, script_chunk=3, negatives=0)
    states = []
    for overlapped in (True, False):
        redis_client.flushall()
        set_categories(redis_client, {f"i{j}": f"c{j % 3}" for j in range(ITEMS)})
        redis_client.set(redis_keys.SPEED_VERSION, "v1")  # served already: no rebuild, live deltas only
        add_events(redis_client, settings, events)
        consumer = SpeedConsumer(redis_client, settings, name="c1")
        step = consumer.pump if overlapped else consumer.poll_once
        in_flight_after_a_step = []
        while step(block=False):
            in_flight_after_a_step.append(consumer._in_flight is not None)
        assert any(in_flight_after_a_step) == overlapped  # a full batch each time: the loop was behind
        assert group_lag(redis_client, settings.redis.stream, settings.speed.group) == 0
        states.append({key: value for key, value in _dump(redis_client).items() if ":speed:" not in key})
    assert states[0] == states[1]
    assert int(redis_client.get(redis_keys.user_event_count("u1", "v1"))) > 10


def test_a_chunk_writes_each_counter_key_once_whatever_its_members(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A session walking 50 new items: each trending and popularity key of the chunk gets one ZMSCORE and
    one ZADD for all its members (not a ZINCRBY a member), each co-visit row one HMGET and one HSET (not an
    HINCRBY a member), and the sums are the rule's."""
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=50, covis_steps=10)
    start = within_one_day(timedelta(minutes=5), timedelta(seconds=50))
    events = [
        make_event(EventType.VIEW, f"i{j}", ts=start + timedelta(seconds=j), received_at=start + timedelta(seconds=j))
        for j in range(50)
    ]
    redis_client.flushall()
    redis_client.config_resetstat()
    result = Applier(redis_client, settings).apply(events, [], now_s=events[-1].ts.timestamp())
    assert result.applied == 50 and not result.failed

    calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in redis_client.info("commandstats").items()}
    # The bucket's count (TRENDING_VERSIONS) has a single member when the events fall in one trending
    # bucket; every other counter key's members go in one ZADD.
    buckets = {int(event.ts.timestamp()) // settings.speed.trending_bucket_s for event in events}
    assert calls.get("zincrby", 0) == (len(buckets) == 1)
    # The 49 co-visit rows (i0..i48: i49 follows them all) each gained followers: one HLEN each, and one
    # HMGET and one HSET each (i48's single follower one HINCRBY), not one a member (~440).
    assert calls["hlen"] == 49 and calls["hmget"] <= 50 and calls["hset"] <= 50
    # Per event its session's items and its item's sessions, then one a counter key (~440 ZINCRBY before).
    assert calls["zadd"] + calls.get("zincrby", 0) <= 4 * 50
    units = redis_client.hgetall(redis_keys.covisitation("i0"))
    assert follow_weights([m.decode() for m in units], [int(u) for u in units.values()]) == {f"i{g}": 1 / g for g in range(1, 11)}  # exactly
    day = redis_keys.popularity_day(int(events[0].ts.timestamp() // 86_400))
    assert redis_client.zcard(day) == 50 and redis_client.zscore(day, "i7") == 1


def test_a_chunk_checks_the_size_only_of_keys_a_member_joined(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Two sessions walk the same 30 items, a chunk each. The second adds no member to any co-visit row
    (the same pairs again) but joins each item's neighbour sessions: only those keys get their size read
    (HLEN a co-visit hash, ZCARD a sorted set)."""
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=30, covis_steps=3)
    start = datetime.now(UTC) - timedelta(minutes=5)
    redis_client.flushall()
    applier = Applier(redis_client, settings)
    sizes = []
    for session in ("s1", "s2"):
        events = [
            make_event(EventType.VIEW, f"i{j}", session_id=session, ts=start + timedelta(seconds=j))
            for j in range(30)
        ]
        redis_client.config_resetstat()
        assert applier.apply(events, [], now_s=events[-1].ts.timestamp()).applied == 30
        sizes.append((_calls(redis_client, "hlen"), _calls(redis_client, "zcard")))
    rows = 29  # i0..i28 have followers; each item has its neighbour-sessions key
    assert sizes == [(rows, 30), (0, 30)]
    assert redis_client.zcard(redis_keys.item_sessions("i7")) == 2


def test_an_aggregate_key_gets_its_expiry_when_created_and_only_then(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Events one at a time: the first view of an item creates today's popularity and the bucket's trending
    key with their fixed expiry; views of the same item send no EXPIREAT; a key gone (expired) and
    written again gets its expiry again."""
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=1)
    bucket_s = settings.speed.trending_bucket_s
    middle = int(datetime.now(UTC).timestamp()) // bucket_s * bucket_s - bucket_s // 2  # the last bucket's
    redis_client.flushall()
    applier = Applier(redis_client, settings)

    def view(item: str, seconds: int) -> int:
        """Apply one view (all in one trending bucket); the EXPIREATs it sent."""
        ts = datetime.fromtimestamp(middle - seconds, UTC)
        redis_client.config_resetstat()
        assert applier.apply([make_event(EventType.VIEW, item, ts=ts, received_at=ts)], []).applied == 1
        return _calls(redis_client, "expireat")

    day = redis_keys.popularity_day((middle - 3) // 86_400)
    assert view("i1", 3) == 2
    # Only the aggregates: a person's keys get a sliding expiry (Redis' clock + TTL) with every event.
    aggregates = {"popularity_days", "trending_buckets"}
    expiry = {
        key: redis_client.expiretime(key)
        for key in redis_client.keys("*")
        if redis_keys.family_of(key) in aggregates
    }
    assert day.encode() in expiry and {redis_keys.family_of(k) for k in expiry} == aggregates
    assert all(at > 0 for at in expiry.values())
    assert view("i1", 2) == 0  # no member joined: the keys keep the expiry they were given
    assert view("i2", 1) == 2  # a member joined: the expiry is set again (the same time)
    redis_client.delete(day)
    assert view("i2", 0) == 1
    assert {key: redis_client.expiretime(key) for key in expiry} == expiry


def test_a_restarted_consumer_reads_its_pending_entries_once_while_the_loop_overlaps(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Restarted under the same name, a consumer reads the entries its predecessor left unacknowledged,
    then new ones. With batches in flight, its own pending entries are read on from where the last read
    ended, not from the start again: that would hand it the entries in flight a second time."""
    _publish_v1(tmp_path, np.random.default_rng(3))
    # Claims of idle entries (its own in flight among them, past a short claim_idle_ms) kept out.
    settings = speed_settings(tmp_path, redis_server.url, batch_size=5, script_chunk=5, claim_idle_ms=60_000)
    events = [make_event(EventType.VIEW, f"i{j % ITEMS}", anonymous_id=f"d{j}", session_id=f"s{j}") for j in range(23)]
    add_events(redis_client, settings, events)
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    stream = redis_keys.stream(settings.redis.stream)
    redis_client.xreadgroup(settings.speed.group, "c1", {stream: ">"}, count=12)  # the predecessor's, unacknowledged

    read = 0
    while handled := consumer.pump(block=False):
        read += handled
    assert read == len(events)
    assert group_lag(redis_client, settings.redis.stream, settings.speed.group) == 0
    assert sum(int(v) for v in redis_client.hgetall(redis_keys.session_counts("d0", "s0")).values()) == 1


def test_a_lull_with_two_batches_under_way_advances_and_reads_again_instead_of_draining(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """At a high rate the read sent ahead can find nothing only because it went out just before the next
    entries: the loop starts the prepared batch, finishes the one before it and reads again, so the
    entries that came meanwhile keep it overlapped. An event that arrives alone costs no such read."""
    _publish_v1(tmp_path, np.random.default_rng(4))
    # The clock's housekeeping (registry checks, claims, re-sums, impression counts) drains the loop when
    # due: spaced out of this test's reach, a slow step cannot drain it between two pumps.
    settings = speed_settings(
        tmp_path, redis_server.url, batch_size=5, script_chunk=5, claim_idle_ms=60_000,
        claim_interval_s=3600.0, trending_refresh_s=3600.0,
    )  # fmt: skip
    settings = settings.model_copy(
        update={"experiments": settings.experiments.model_copy(update={"count_interval_s": 3600.0})}
    )
    views = [make_event(EventType.VIEW, f"i{j % ITEMS}", anonymous_id=f"d{j}", session_id=f"s{j}") for j in range(13)]
    add_events(redis_client, settings, views[:10])
    consumer = SpeedConsumer(redis_client, settings, name="c1")
    assert consumer.pump(block=False) == 5  # batch A prepared, the next read sent ahead
    assert consumer.pump(block=False) == 5  # batch B prepared, A started; the read sent ahead finds nothing
    add_events(redis_client, settings, views[10:])  # arrive while both are under way
    assert consumer.pump(block=False) == 3  # read again after advancing: not drained
    assert consumer.pump(block=False) == 0  # then nothing: everything finished and acknowledged
    assert group_lag(redis_client, settings.redis.stream, settings.speed.group) == 0
    assert redis_client.xpending(redis_keys.stream(settings.redis.stream), settings.speed.group)["pending"] == 0

    add_events(redis_client, settings, [make_event(EventType.VIEW, "i1", anonymous_id="lone", session_id="s-lone")])
    assert consumer.pump(block=False) == 1  # prepared, the next read sent ahead
    redis_client.config_resetstat()
    assert consumer.pump(block=False) == 0  # the read sent ahead found nothing: drained at once
    assert _calls(redis_client, "xreadgroup") == 0
    assert read_speed_state(redis_client, "lone", session_id="s-lone").session_counts == {"view": 1}


def test_a_persons_item_weights_add_up_across_chunks_whatever_their_number_of_members(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A chunk writes a hash's several float increments as one read and one write: sums across chunks and
    across members stay those of one increment at a time, and categories sum alike (same seconds, no decay)."""
    settings = speed_settings(tmp_path, redis_server.url, script_chunk=3, script_chunk_min=3)
    set_categories(redis_client, {"i1": "shoes", "i2": "hats", "i3": "hats"})
    applier = Applier(redis_client, settings)
    at = datetime.now(UTC)

    def apply(*views: tuple[EventType, str]) -> None:
        events = [make_event(kind, item, user_id="u1", ts=at, received_at=at) for kind, item in views]
        assert applier.apply(events, []).applied == len(events)

    apply((EventType.VIEW, "i1"), (EventType.VIEW, "i2"), (EventType.VIEW, "i3"))  # 3 members, 3 new
    apply((EventType.ADD_TO_CART, "i1"), (EventType.VIEW, "i2"), (EventType.ADD_TO_CART, "i2"))  # 2 members
    apply((EventType.VIEW, "i3"),)  # 1 member
    state = read_speed_state(redis_client, "u1", session_id="s1")
    assert state.person_items == {"i1": 1.0 + 3.0, "i2": 1.0 + 1.0 + 3.0, "i3": 2.0}
    affinity = state.category_affinity
    assert affinity["hats"] / affinity["shoes"] == pytest.approx((1.0 + 1.0 + 3.0 + 2.0) / (1.0 + 3.0))
