"""The bandit over serving variants on a real Redis: serving's assignment (serving/core/experiments.py
`Bandit`), the speed layer's counting of served lists and their rewards (speed_layer/bandit.py,
apply_events.lua), and the shared sampling code (common/bandit.py)."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common import bandit, redis_keys
from common.events import Consent, Event, EventType
from common.redis_server import LocalRedisCluster, RedisServer
from common.registry import Registry
from common.settings import ExperimentSettings, Settings
from evaluation.bandit import ReplayBandit
from serving.core.erasure import erase_person
from serving.core.experiments import Bandit
from serving.core.load import Shed
from serving.core.recommender import RecRequest, recommend
from serving.main import create_app
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import add_events, make_event, speed_settings
from tests.test_serving_support import make_settings, serving_state

pytest_plugins = ["tests.test_serving_support"]

ARMS = {"ranker": 0.4, "als_only": 0.3, "popular": 0.3}  # the fallback shares; in bandit mode only the names
ROUND = 50  # lists served between two passes of the speed consumer


def experiment(**fields: Any) -> ExperimentSettings:
    return ExperimentSettings(
        **{"shares": ARMS, "control": "popular", "mode": "bandit", "floor": 0.05, "cache_s": 0.0, **fields}
    )


@pytest.fixture
def settings(tmp_path: Path, redis_server: RedisServer) -> Settings:
    base = speed_settings(tmp_path, redis_server.url)
    return base.model_copy(update={"experiments": experiment()})


def consumer(client: redis.Redis, settings: Settings, name: str) -> SpeedConsumer:
    return SpeedConsumer(client, settings, Registry(settings.models.root), name=name)


def drain(speed: SpeedConsumer) -> None:
    """Apply every event on the stream and count every served list."""
    while speed.poll_once(block=False):
        pass
    speed.impressions.count()


def click(person: str, session: str | None, request_id: str, **extra: Any) -> Event:
    event = make_event(EventType.CLICK, "i1", anonymous_id=person, session_id=session, **extra)
    return event.model_copy(update={"rec_request_id": request_id})


def login(device: str, user: str, session: str) -> Event:
    return make_event(EventType.IDENTIFY, None, anonymous_id=device, user_id=user, session_id=session)


def simulate(
    client: redis.Redis,
    settings: Settings,
    ctr: Mapping[str, float],
    lists: int,
    seed: int = 7,
    context: str = "home",
) -> list[str]:
    """Serve `lists` lists, each to a new person, clicked with the arm's click-through; the speed
    consumer applies the clicks and counts the lists after every ROUND. Returns the arms in order."""
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=seed)
    speed = consumer(client, settings, "c1")
    feedback = random.Random(seed + 1)
    chosen: list[str] = []
    for start in range(0, lists, ROUND):
        clicks = []
        for n in range(start, min(start + ROUND, lists)):
            person, session = f"p{n}", f"s{n}"
            arm = serving.arm(client, person, session, context, sticky=True)
            request_id = uuid.uuid4().hex
            serving.record(client, request_id, context, arm)
            chosen.append(arm)
            if feedback.random() < ctr[arm]:
                clicks.append(click(person, session, request_id))
        add_events(client, settings, clicks)
        drain(speed)
    return chosen


def stored_counts(client: redis.Redis, settings: Settings) -> bandit.Counts:
    version = bandit.experiment_version(settings.experiments.shares, settings.experiments.epoch)
    reply = client.hgetall(redis_keys.bandit_counts(settings.experiments.name, version))
    return bandit.Counts.from_redis(cast(dict[bytes, bytes], reply))


# ---------------------------------------------------------------- learning


def test_the_clearly_better_arm_takes_over_80_percent_within_1500_lists(
    redis_client: redis.Redis, settings: Settings
) -> None:
    ctr = {"ranker": 0.30, "als_only": 0.10, "popular": 0.10}

    chosen = simulate(redis_client, settings, ctr, lists=1500)

    last = Counter(chosen[-300:])  # the traffic of the last 300 lists
    assert last["ranker"] / 300 >= 0.80, last
    counts = stored_counts(redis_client, settings)
    assert sum(counts.get("home", arm, bandit.SERVED) for arm in ARMS) == 1500  # every list counted once
    first = Counter(chosen[:ROUND])  # before any feedback: Thompson draws from equal priors
    assert first["ranker"] / ROUND < 0.6, first


def test_with_equal_arms_no_arm_falls_below_its_floor(redis_client: redis.Redis, settings: Settings) -> None:
    settings = settings.model_copy(update={"experiments": experiment(floor=0.15)})
    ctr = dict.fromkeys(ARMS, 0.15)

    chosen = simulate(redis_client, settings, ctr, lists=900, seed=11)

    shares = {arm: n / len(chosen) for arm, n in Counter(chosen).items()}
    assert set(shares) == set(ARMS)
    assert min(shares.values()) >= 0.15, shares
    posteriors = stored_counts(redis_client, settings).posteriors("home", sorted(ARMS), "click")
    assert min(bandit.shares(posteriors, 0.15).values()) >= 0.15


def test_a_losing_arm_keeps_its_floor() -> None:
    # The floor holds whatever the posteriors say: an arm with no click in 1000 lists still gets it.
    posteriors = {"a": bandit.posterior(1000, 300), "b": bandit.posterior(1000, 0)}
    rng = random.Random(3)
    picks = Counter(bandit.choose(posteriors, 0.1, rng) for _ in range(20_000))
    assert 0.09 <= picks["b"] / 20_000 <= 0.11
    assert bandit.shares(posteriors, 0.1)["b"] == pytest.approx(0.1, abs=1e-3)


def test_contexts_learn_apart(redis_client: redis.Redis, settings: Settings) -> None:
    simulate(
        redis_client, settings, {"ranker": 0.3, "als_only": 0.05, "popular": 0.05}, lists=300, context="cart"
    )
    counts = stored_counts(redis_client, settings)
    assert sum(counts.get("cart", arm, bandit.SERVED) for arm in ARMS) == 300
    assert sum(counts.get("home", arm, bandit.SERVED) for arm in ARMS) == 0


# ---------------------------------------------------------------- exactly once, restarts


def test_a_restart_loses_no_posterior(redis_client: redis.Redis, settings: Settings) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=1)
    ids = [uuid.uuid4().hex for _ in range(40)]
    for n, request_id in enumerate(ids):
        serving.record(redis_client, request_id, "home", "ranker" if n % 2 else "popular")
    # A consumer reads the served lists and dies before counting them (they stay pending for it).
    consumer(redis_client, settings, "dead").pubsub.close()
    redis_client.xreadgroup(redis_keys.BANDIT_GROUP, "dead", {redis_keys.BANDIT_IMPRESSIONS: ">"})
    add_events(redis_client, settings, [click(f"p{n}", f"s{n}", ids[n]) for n in range(0, 40, 4)])

    fresh = consumer(redis_client, settings, "c2")  # a new process on the same Redis
    drain(fresh)  # the clicks
    time.sleep(settings.speed.claim_idle_ms / 1000 + 0.05)
    drain(fresh)  # the dead one's entries, idle past claim_idle_ms by now, claimed and counted

    counts = stored_counts(redis_client, settings)
    assert counts.get("home", "popular", bandit.SERVED) == 20
    assert counts.get("home", "ranker", bandit.SERVED) == 20
    assert counts.get("home", "popular", "click") == 10  # the clicked ones were the even, popular lists
    # A new serving worker reads the same posteriors.
    restarted = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=2)
    assert restarted.counts(redis_client).raw == counts.raw
    drain(consumer(redis_client, settings, "c3"))
    assert stored_counts(redis_client, settings).raw == counts.raw  # nothing counted twice


def test_a_redelivered_click_counts_once(redis_client: redis.Redis, settings: Settings) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=1)
    request_id = uuid.uuid4().hex
    serving.record(redis_client, request_id, "product", "als_only")
    event = click("p1", "s1", request_id)
    other_click_same_list = click("p1", "s1", request_id)
    add_events(redis_client, settings, [event, event])  # the client retried: the same event_id twice
    speed = consumer(redis_client, settings, "c1")
    drain(speed)
    add_events(redis_client, settings, [event, other_click_same_list])  # again, and a second click
    drain(speed)

    counts = stored_counts(redis_client, settings)
    assert counts.get("product", "als_only", bandit.SERVED) == 1
    assert counts.get("product", "als_only", "click") == 1  # a list is rewarded for a click once


def test_a_purchase_after_a_click_in_the_session_is_the_second_reward(
    redis_client: redis.Redis, settings: Settings
) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=1)
    clicked, ignored = uuid.uuid4().hex, uuid.uuid4().hex
    serving.record(redis_client, clicked, "home", "ranker")
    serving.record(redis_client, ignored, "home", "popular")
    purchase = make_event(EventType.PURCHASE, "i1", anonymous_id="p1", session_id="s1", quantity=1)
    events = [
        make_event(EventType.PURCHASE, "i2", anonymous_id="p2", session_id="s2", quantity=1),  # no click
        click("p1", "s1", clicked),
        purchase,
        purchase,  # re-delivered
        make_event(EventType.PURCHASE, "i3", anonymous_id="p1", session_id="s1", quantity=1),  # one per click
    ]
    add_events(redis_client, settings, events)
    drain(consumer(redis_client, settings, "c1"))

    counts = stored_counts(redis_client, settings)
    assert counts.get("home", "ranker", "click") == 1
    assert counts.get("home", "ranker", "purchase") == 1
    assert counts.get("home", "popular", "purchase") == 0
    assert counts.posterior("home", "ranker", "purchase") == bandit.Beta(2.0, 1.0)


def test_a_changed_arm_set_starts_fresh(redis_client: redis.Redis, settings: Settings) -> None:
    simulate(redis_client, settings, dict.fromkeys(ARMS, 0.2), lists=100)
    changed = settings.model_copy(
        update={"experiments": experiment(shares={"ranker": 0.5, "popular": 0.5}, floor=0.1)}
    )
    fresh = Bandit(changed.experiments, changed.speed.session_ttl_s)
    assert fresh.counts(redis_client).raw == {}
    assert fresh.version != Bandit(settings.experiments, settings.speed.session_ttl_s).version


# ---------------------------------------------------------------- a person's assignment


def test_the_arm_is_sticky_within_a_session(redis_client: redis.Redis, settings: Settings) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=5)
    first = {s: serving.arm(redis_client, "p1", s, "home", sticky=True) for s in ("s1", "s2", "s3", "s4")}
    # The posteriors move a lot meanwhile, and a new worker (other random state) serves the next requests.
    simulate(redis_client, settings, {"ranker": 0.9, "als_only": 0.0, "popular": 0.0}, lists=200)
    other = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=6)
    again = {s: other.arm(redis_client, "p1", s, "home", sticky=True) for s in first}
    assert again == first
    ttl = redis_client.ttl(redis_keys.session_arms("p1", "s1"))
    assert 0 < ttl <= settings.speed.session_ttl_s


def test_without_personalisation_consent_no_arm_is_stored(
    redis_client: redis.Redis, settings: Settings
) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=5)
    serving.arm(redis_client, "p1", "s1", "home", sticky=False)
    assert redis_client.keys(redis_keys.person_keys_match("p1")) == []


def test_erasure_removes_the_persons_arm_and_open_purchase_reward(
    redis_client: redis.Redis, settings: Settings
) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=5)
    arm = serving.arm(redis_client, "p1", "s1", "cart", sticky=True)
    request_id = uuid.uuid4().hex
    serving.record(redis_client, request_id, "cart", arm)
    add_events(redis_client, settings, [click("p1", "s1", request_id)])
    drain(consumer(redis_client, settings, "c1"))
    arms_key, clicked_key = redis_keys.session_arms("p1", "s1"), redis_keys.session_clicked("p1", "s1")
    assert redis_client.exists(arms_key, clicked_key) == 2
    assert {arms_key.encode(), clicked_key.encode()} <= redis_keys.holdings(redis_client, "p1").keys

    erase_person(redis_client, settings, "p1")

    assert redis_client.exists(arms_key, clicked_key) == 0
    assert stored_counts(redis_client, settings).get("cart", arm, "click") == 1  # the aggregate stays


# ---------------------------------------------------------------- through the API


@pytest.fixture
def bandit_api(published: Any, recs_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("RECS_EXPERIMENTS__MODE", "bandit")
    monkeypatch.setenv("RECS_EXPERIMENTS__CACHE_S", "0")
    with TestClient(create_app(make_settings())) as test_client:
        yield test_client


def test_the_api_serves_an_arm_and_the_speed_layer_counts_its_list(
    bandit_api: TestClient, redis_client: redis.Redis
) -> None:
    settings = make_settings()
    params = {"anonymous_id": "p1", "session_id": "s1", "context": "cart", "k": 5}
    bodies = [bandit_api.get("/v1/recommendations", params=params).json() for _ in range(3)]
    variants = {b["variant"] for b in bodies}
    assert len(variants) == 1 and variants <= set(settings.experiments.shares)  # sticky in the session
    variant = bodies[0]["variant"]
    event = {
        "event_id": str(uuid.uuid4()), "event_type": "click", "ts": datetime.now(UTC).isoformat(),
        "anonymous_id": "p1", "session_id": "s1", "item_id": bodies[0]["items"][0]["item_id"],
        "rec_request_id": bodies[0]["request_id"], "consent": Consent.PERSONALISATION.value,
    }  # fmt: skip
    assert bandit_api.post("/v1/events", json=event).status_code < 300
    drain(consumer(redis_client, settings, "c1"))

    counts = stored_counts(redis_client, settings)
    assert counts.get("cart", variant, bandit.SERVED) == 3
    assert counts.get("cart", variant, "click") == 1
    samples = {
        (s.name, s.labels["context"], s.labels["arm"], s.labels.get("reward")): s.value
        for family in text_string_to_metric_families(bandit_api.get("/metrics").text)
        for s in family.samples
        if s.name.startswith("recs_bandit_")
    }
    assert samples[("recs_bandit_alpha", "cart", variant, "click")] == 2.0
    assert samples[("recs_bandit_beta", "cart", variant, "click")] == 3.0
    assert sum(
        v for (name, context, _, _), v in samples.items() if name == "recs_bandit_share" and context == "cart"
    ) == pytest.approx(1.0)


def test_a_list_shed_under_overload_keeps_the_arm_but_does_not_count_for_it(
    bandit_api: TestClient, redis_client: redis.Redis
) -> None:
    settings = make_settings()
    state = serving_state(bandit_api)
    req = RecRequest("u1", None, "s1", 5, "home")
    whole = recommend(state, req)
    shed = [recommend(state, req, shed=kind) for kind in (Shed.NEIGHBOURS, Shed.NEIGHBOURS)]
    drain(consumer(redis_client, settings, "c1"))

    assert {result.variant for result in shed} == {whole.variant}  # the session's arm, shed or not
    assert redis_client.exists(redis_keys.bandit_served(whole.request_id)) == 1
    assert redis_client.exists(*(redis_keys.bandit_served(result.request_id) for result in shed)) == 0
    assert stored_counts(redis_client, settings).get("home", whole.variant, bandit.SERVED) == 1


# ---------------------------------------------------------------- the replay's bandit


def test_the_replay_bandit_counts_regret_against_the_best_fixed_arm() -> None:
    learner = ReplayBandit(("good", "bad"), k=3, floor=0.05, seed=1)
    lists = {"good": ["t", "x", "y"], "bad": ["x", "y", "z"]}
    for _ in range(400):  # "good" always holds the next item, "bad" never
        learner.step(lists, "t")
    summary = learner.summary()
    assert summary["best_fixed_arm"] == "good"
    assert summary["arms"]["good"]["fixed_hits"] == 400 and summary["arms"]["bad"]["fixed_hits"] == 0
    assert summary["regret"] == 400 - summary["hits"] == summary["arms"]["bad"]["share"] * 400
    assert 0.025 <= summary["arms"]["bad"]["share"] <= 0.1  # explored at about its floor, no more


def test_a_click_without_personalisation_consent_counts_but_keeps_nothing_of_the_person(
    redis_client: redis.Redis, settings: Settings
) -> None:
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=1)
    request_id = uuid.uuid4().hex
    serving.record(redis_client, request_id, "home", "popular")
    add_events(redis_client, settings, [click("p1", "s1", request_id, consent=Consent.NONE)])
    drain(consumer(redis_client, settings, "c1"))

    assert stored_counts(redis_client, settings).get("home", "popular", "click") == 1
    assert redis_client.keys(redis_keys.person_keys_match("p1")) == []  # no clicked list waits for a purchase


# ---------------------------------------------------------------- Redis Cluster


def _rewarded(client: redis.Redis, url: str, tmp_path: Path) -> bandit.Counts:
    """Lists served, the clicks and purchases of nine sessions (three across a login) that reward them or
    not (every event delivered twice), counted by the speed consumer."""
    settings = speed_settings(tmp_path, url).model_copy(update={"experiments": experiment()})
    serving = Bandit(settings.experiments, settings.speed.session_ttl_s, seed=1)
    lists = {name: uuid.uuid4().hex for name in "abcdefghij"}
    arms = ["ranker", "popular", "als_only", "ranker", "popular", "als_only", "ranker", "popular", "als_only", "ranker"]
    for name, arm in zip("abcdefghij", arms, strict=True):
        serving.record(client, lists[name], "home", arm)

    def buy(person: str, session: str, **extra: Any) -> Event:
        return make_event(EventType.PURCHASE, "i2", anonymous_id=person, session_id=session, quantity=1, **extra)

    events = [
        click("p1", "s1", lists["a"]),  # takes a
        click("p1", "s1", lists["a"]),  # a second click on a earns nothing
        click("p1", "s1", lists["b"]),  # takes b: the session's list awaiting a purchase
        click("p2", "s2", lists["b"]),  # b is taken: nothing
        click("p6", "s6", lists["e"]),  # takes e (never bought)
        click("p2", "s2", lists["e"]),  # e is taken, after p2's first event: the batch's order decides
        buy("p2", "s2"),  # p2 took no list: nothing
        buy("p1", "s1"),  # rewards b, the last list p1 took
        buy("p1", "s1"),  # nothing is left to reward
        click("p3", "s3", lists["c"], consent=Consent.ANALYTICS),  # counts, keeps nothing for a purchase
        buy("p3", "s3", consent=Consent.ANALYTICS),
        click("p4", "s4", lists["d"]),
        click("p4", "s4", "not-served"),  # took nothing, so it does not hide d from the purchase
        buy("p4", "s4"),  # rewards d
        buy("p5", "s5"),  # no click
        click("p7", "s7", lists["f"]),  # on a device, before its login
        login("p7", "u7", "s7"),
        buy("p7", "s7", user_id="u7"),  # rewards f, clicked before the login
        click("p8", "s8", lists["g"]),
        login("p8", "u8", "s8"),
        click("p8", "s8", lists["h"], user_id="u8"),  # after the login: the session's last list
        buy("p8", "s8", user_id="u8"),  # rewards h
        click("p9-phone", "s9", lists["i"], user_id="u9"),  # the user's session already awaits i
        click("p9", "s9", lists["j"]),
        login("p9", "u9", "s9"),  # i stays the session's list
        buy("p9", "s9", user_id="u9"),  # rewards i
    ]
    speed = consumer(client, settings, "c1")
    for _ in range(2):
        add_events(client, settings, events)
        drain(speed)
    return stored_counts(client, settings)


def test_on_a_cluster_the_rewards_are_counted_once_as_on_one_redis(
    redis_server: RedisServer, redis_client: redis.Redis, redis_cluster: LocalRedisCluster,
    cluster_client: redis.Redis, tmp_path: Path,
) -> None:  # fmt: skip
    single = _rewarded(redis_client, redis_server.url, tmp_path)
    cluster = _rewarded(cluster_client, redis_cluster.url, tmp_path)
    assert cluster.raw == single.raw
    assert single.get("home", "ranker", "click") == 4 and single.get("home", "ranker", "purchase") == 1  # a, d, g, j
    assert single.get("home", "popular", "click") == 3 and single.get("home", "popular", "purchase") == 2  # b, e, h
    assert single.get("home", "als_only", "click") == 3 and single.get("home", "als_only", "purchase") == 2  # c, f, i
