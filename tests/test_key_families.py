"""Key families: every key the speed layer writes belongs to one, and `recs speed status` counts each
family's keys exactly (real Redis, events through the real consumer), or estimates them when cut short."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from common import redis_keys
from common.bandit import experiment_version
from common.consent import record_withdrawal
from common.events import Consent, Event, EventType
from common.features import day_index
from common.key_memory import keyspace_usage
from common.neighbours import session_token
from common.redis_keys import FAMILIES, OTHER_FAMILY, family_of
from common.redis_server import RedisServer
from common.registry import Registry
from common.settings import ExperimentSettings
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import add_events, make_event, publish_model, set_categories, speed_settings

USERS = ["u0", "u1", "u2", "u3"]
GUESTS = ["g0", "g1"]
ITEMS = [f"i{j}" for j in range(10)]
CATEGORIES = {item: f"c{j % 3}" for j, item in enumerate(ITEMS)}
EXPERIMENT = ExperimentSettings()
BANDIT_VERSION = experiment_version(EXPERIMENT.shares, EXPERIMENT.epoch)


def _events(rng: np.random.Generator) -> list[Event]:
    """Two sessions a person: views, a cart in the first, a purchase in the second; one identify."""
    out = []
    for person in USERS + GUESTS:
        user = person if person in USERS else None
        for s in range(2):
            session = f"s-{person}-{s}"
            items = [ITEMS[int(j)] for j in rng.choice(len(ITEMS), size=4, replace=False)]
            kinds = [EventType.VIEW] * 3 + [EventType.ADD_TO_CART if s == 0 else EventType.PURCHASE]
            out += [
                make_event(kind, item, anonymous_id=f"d-{person}", user_id=user, session_id=session)
                for kind, item in zip(kinds, items, strict=True)
            ]
    out.append(make_event(EventType.IDENTIFY, None, anonymous_id="d-u0", user_id="u0", session_id="s-u0-1"))
    # A visitor without personalisation consent: aggregates and the unlinked markers only, no key of theirs.
    out.append(make_event(EventType.PURCHASE, ITEMS[0], anonymous_id="d-declined", consent=Consent.ANALYTICS))
    return out


def _exact_counts(client: redis.Redis, events: list[Event]) -> dict[str, int]:
    """Each family's keys, counted by forming every key it could hold from the ids used (not by pattern)."""
    persons = USERS + GUESTS
    devices = [f"d-{p}" for p in persons]
    sessions = [(owner, f"s-{p}-{s}") for owner in persons + devices for p in persons for s in range(2)]
    times = [e.ts.timestamp() for e in events]
    bucket_s = 300  # speed_settings keeps the default trending bucket

    def n(keys: list[str]) -> int:
        return sum(bool(client.exists(k)) for k in set(keys))

    return {
        "stream_dead_letters": n([redis_keys.dead_letter()]),
        "stream": n([redis_keys.stream()]),
        "seen": n([redis_keys.seen_events(p) for p in persons + devices]),
        # Written where global effects are applied per slot group (Redis Cluster): none on one Redis.
        "global_plans": n([redis_keys.global_plans(p) for p in persons + devices]),
        "group_seen": n([redis_keys.group_seen(g) for g in range(redis_keys.SLOT_GROUPS)]),
        "person_sessions": n([redis_keys.person_sessions(p) for p in persons + devices]),
        "session_recent": n([redis_keys.session_recent(p, s) for p, s in sessions]),
        "session_categories": n([redis_keys.session_categories(p, s) for p, s in sessions]),
        "session_cart": n([redis_keys.session_cart(p, s) for p, s in sessions]),
        "session_counts": n([redis_keys.session_counts(p, s) for p, s in sessions]),
        "session_arms": n([redis_keys.session_arms(p, s) for p, s in sessions]),
        "session_clicked": n([redis_keys.session_clicked(p, s) for p, s in sessions]),
        "person_items": n([redis_keys.person_items(p) for p in persons + devices]),
        "person_purchases": n([redis_keys.person_purchases(p) for p in persons + devices]),
        "delta_counts": n([redis_keys.user_event_count(u, "v1") for u in USERS]),
        "deltas": n([redis_keys.user_delta(u, "v1") for u in USERS]),
        "person_devices": n([redis_keys.person_devices(p) for p in persons]),
        "aliases": n([redis_keys.alias(d) for d in devices]),
        # The cluster's identify merge in steps: the stash goes at its end, the scratch keys inside its script.
        "identify_stash": n([redis_keys.identify_stash(d, e.event_id) for d in devices for e in events]),
        "identify_scratch": n([redis_keys.identify_scratch(u, "seen") for u in persons]),
        "seen_unlinked": n([redis_keys.SEEN_UNLINKED]),
        "erased": n([redis_keys.erased("someone-erased")]),
        "consent_withdrawals": n([redis_keys.consent_withdrawal("someone-withdrawn")]),
        "trending_top": n([redis_keys.TRENDING_TOP, redis_keys.TRENDING_TOP_TOKEN, redis_keys.TRENDING_REFRESH_LOCK, redis_keys.TRENDING_VERSIONS]),
        "trending_buckets": n([redis_keys.trending_bucket(int(t // bucket_s) * bucket_s) for t in times]),
        "popularity_days": n([redis_keys.popularity_day(d) for d in {day_index(t) for t in times}]),
        "category_bestsellers": n([redis_keys.category_bestsellers(c) for c in set(CATEGORIES.values())]),
        "covisitation": n([redis_keys.covisitation(i) for i in ITEMS]),
        "sorted_covisitation": n([redis_keys.sorted_covisitation(i) for i in ITEMS]),  # none: only migrations read it
        "float_covisitation": n([redis_keys.float_covisitation(i) for i in ITEMS]),  # likewise
        "neighbour_sessions": n([redis_keys.neighbour_session(session_token(p, s)) for p, s in sessions]),
        "item_sessions": n([redis_keys.item_sessions(i) for i in ITEMS]),
        "item_state": n(
            [redis_keys.item_state(i) for i in ITEMS] + [redis_keys.OUT_OF_STOCK, redis_keys.PROMOTED]
        ),
        "bandit_served": n([redis_keys.bandit_served(e.rec_request_id) for e in events if e.rec_request_id]),
        "bandit_impressions": n([redis_keys.BANDIT_IMPRESSIONS]),  # the consumers' group made it
        "bandit_counts": n([redis_keys.bandit_counts(EXPERIMENT.name, BANDIT_VERSION)]),
        "drift_sample": n([redis_keys.DRIFT_SAMPLE]),  # serving writes it, not the consumer
        "speed_bookkeeping": n(
            [redis_keys.SPEED_VERSION, redis_keys.SPEED_PENDING_VERSION, redis_keys.SPEED_HEARTBEAT, redis_keys.SPEED_MIGRATED]
            + [redis_keys.speed_rebuild_lock("v1"), redis_keys.speed_rebuild_marker("v1")]
        ),
    }


@pytest.fixture
def consumed(redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path) -> list[Event]:
    """Events of users with a batch vector and of guests, applied by the real consumer."""
    settings = speed_settings(tmp_path, redis_server.url)
    registry = Registry(settings.models.root)
    rng = np.random.default_rng(3)
    factors = rng.normal(size=(len(ITEMS), 8)).astype(np.float32)
    publish_model(registry, "v1", datetime.now(UTC) - timedelta(hours=1), factors, USERS)
    set_categories(redis_client, CATEGORIES)
    redis_client.set(redis_keys.erased("someone-erased"), 1)
    record_withdrawal(redis_client, ["someone-withdrawn"], Consent.NONE, 0.0, ttl_s=60)
    events = _events(rng)
    add_events(redis_client, settings, events)
    redis_client.xadd(redis_keys.stream(), {"e": b"{}"})  # malformed: dead-lettered
    consumer = SpeedConsumer(redis_client, settings, registry, name="c1")
    while consumer.poll_once(block=False):
        pass
    return events


def test_each_family_counts_exactly_the_keys_the_consumer_wrote(
    redis_client: redis.Redis, consumed: list[Event]
) -> None:
    usage = keyspace_usage(redis_client)

    assert usage.complete and usage.scanned == usage.total_keys == redis_client.dbsize()
    assert OTHER_FAMILY not in usage.families  # every key belongs to a family
    counted = {name: family.keys for name, family in usage.families.items()}
    expected = _exact_counts(redis_client, consumed)
    assert counted == expected
    assert sum(counted.values()) == usage.total_keys  # no key counted in two families
    for name in ("seen", "seen_unlinked", "session_recent", "deltas", "aliases", "covisitation", "stream"):
        assert counted[name] > 0 and usage.families[name].bytes > 0, name


def test_speed_status_shows_memory_per_family(
    redis_client: redis.Redis, consumed: list[Event], recs_env: Path
) -> None:
    from recs.main import app

    result = CliRunner().invoke(app, ["speed", "status"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["redis"]["maxmemory_policy"] == "noeviction"
    assert report["keyspace"]["families"]["seen"]["keys"] == len(USERS + GUESTS)
    assert set(report["keyspace"]["families"]) == {f.name for f in FAMILIES}


def test_a_pass_cut_short_estimates_from_what_it_saw(redis_client: redis.Redis) -> None:
    pipe = redis_client.pipeline(transaction=False)
    for j in range(8000):
        pipe.set(redis_keys.session_counts(f"p{j}", "s"), "x" * 100)
    for j in range(2000):
        pipe.hset(redis_keys.covisitation(f"i{j}"), mapping={"a": 1, "b": 2})
    pipe.execute()

    usage = keyspace_usage(redis_client, budget_s=0.0, samples=20)

    assert not usage.complete and usage.scanned < usage.total_keys == 10_000
    sessions, covis = usage.families["session_counts"], usage.families["covisitation"]
    assert sessions.keys == pytest.approx(8000, rel=0.25) and covis.keys == pytest.approx(2000, rel=0.35)
    assert sessions.sampled == covis.sampled == 20
    one = redis_client.memory_usage(redis_keys.session_counts("p0", "s"))
    assert sessions.bytes == pytest.approx(one * sessions.keys, rel=0.2)


def test_every_key_function_falls_in_its_own_family() -> None:
    person = "a}:s:b*"  # characters a pattern could be fooled by
    cases = {
        redis_keys.seen_events(person): "seen",
        redis_keys.session_recent(person, "x:delta:y"): "session_recent",
        redis_keys.session_cart(person, "s}:seen"): "session_cart",
        redis_keys.user_event_count(person, "v1"): "delta_counts",
        redis_keys.user_delta(person, "v1"): "deltas",
        redis_keys.dead_letter(): "stream_dead_letters",
        redis_keys.stream(): "stream",
        redis_keys.TRENDING_TOP: "trending_top",
        redis_keys.TRENDING_TOP_TOKEN: "trending_top",
        redis_keys.TRENDING_VERSIONS: "trending_top",
        redis_keys.trending_bucket(300): "trending_buckets",
        redis_keys.erased(person): "erased",
        redis_keys.item_state("i:1"): "item_state",
        redis_keys.speed_rebuild_marker("v1"): "speed_bookkeeping",
        "not-ours": OTHER_FAMILY,
    }
    assert {key: family_of(key) for key in cases} == cases


@given(st.integers(min_value=0, max_value=(2**52 - 1)))
def test_a_time_score_is_the_event_time_in_whole_microseconds(micros: int) -> None:
    """Exact, no microsecond lost to a timestamp's double, for any time a double holds exactly (Lua's numbers,
    Redis' scores): until the year 2112."""
    ts = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert redis_keys.time_score(ts) == micros
    assert redis_keys.time_score(ts + timedelta(microseconds=1)) == micros + 1
