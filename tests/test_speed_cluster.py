"""The speed layer on a real Redis Cluster (3 masters, 3 replicas): each event's person effects are one
script call in the person's slot, its global effects one call per slot group, and the state left is
the one the one-script path leaves on a single Redis, exactly once through duplicates and crashes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import redis
from redis.exceptions import RedisClusterException

from common import redis_keys
from common.catalog import ItemUpdate
from common.catalog_state import apply_item_updates
from common.events import Consent, Event, EventType
from common.model import ModelArtifacts
from common.redis_server import LocalRedisCluster, RedisServer, connect
from common.sequence import FOLLOW_UNIT
from common.speed_state import ItemFlagsCopy, NeighbourQuery, read_speed_state
from speed_layer import effects
from speed_layer.effects import Applier
from tests.speed_factories import make_event, set_categories, speed_settings
from tests.test_speed_chunks import ITEMS, Near, _dump, _events, _publish_v1

CATEGORIES = {f"i{j}": f"c{j % 3}" for j in range(ITEMS)}
# Written only by the split path: its markers and plans (the state they guard is compared).
SPLIT_BOOKKEEPING = {"group_seen", "global_plans", "seen_unlinked"}


def _mixed_events(rng: np.random.Generator, n: int) -> list[Event]:
    """The chunk test's sessions, with every fifth event sent without personalisation consent."""
    events = _events(rng, n)
    return [
        e.model_copy(update={"consent": Consent.ANALYTICS}) if j % 5 == 4 else e for j, e in enumerate(events)
    ]


def _state(client: redis.Redis) -> dict[str, object]:
    return {k: v for k, v in _dump(client).items() if redis_keys.family_of(k) not in SPLIT_BOOKKEEPING}


def _apply(client: redis.Redis, tmp_path: Path, url: str, events: list[Event], model: ModelArtifacts,
           batch: int = 40, split: bool | None = None, overlapped: bool = False) -> None:  # fmt: skip
    settings = speed_settings(tmp_path, url, negatives=0, script_chunk=7)
    applier = Applier(client, settings, split=split)
    now_s = max(e.ts.timestamp() for e in events)
    if overlapped:  # as the consumer's loop: every batch started before the first is finished
        started = [applier.start(events[i : i + batch], [model], now_s=now_s) for i in range(0, len(events), batch)]
        results = [applier.finish(one) for one in started]
    else:
        results = [applier.apply(events[i : i + batch], [model], now_s=now_s) for i in range(0, len(events), batch)]
    for result in results:
        assert not result.failed and not result.unresolved


@pytest.fixture
def reference(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> tuple[list[Event], ModelArtifacts, dict[str, object]]:  # fmt: skip
    """Events, the model, and the state the one-script path leaves on a single Redis."""
    rng = np.random.default_rng(11)
    model = _publish_v1(tmp_path, rng)
    events = _mixed_events(rng, 160)
    set_categories(redis_client, CATEGORIES)
    _apply(redis_client, tmp_path, redis_server.url, events, model)
    return events, model, _state(redis_client)


def test_the_split_path_on_a_cluster_leaves_the_one_script_state(
    redis_cluster, cluster_client: redis.Redis, reference, tmp_path: Path
) -> None:
    events, model, expected = reference
    set_categories(cluster_client, CATEGORIES)
    _apply(cluster_client, tmp_path, redis_cluster.url, events, model)
    state = _state(cluster_client)
    assert state == expected
    assert any(redis_keys.family_of(k) == "covisitation" for k in state)  # co-visits went through plans
    assert any(redis_keys.family_of(k) == "item_sessions" for k in state)
    # And the cluster really spread the groups over its masters.
    primaries = {cluster_client.get_node_from_key(k).name for k in state}  # type: ignore[attr-defined]
    assert len(primaries) == 3


@pytest.mark.parametrize("overlapped", [False, True])
def test_the_split_path_on_one_redis_leaves_the_one_script_state(
    redis_server: RedisServer, redis_client: redis.Redis, reference, tmp_path: Path, overlapped: bool
) -> None:
    events, model, expected = reference
    redis_client.flushall()
    set_categories(redis_client, CATEGORIES)
    _apply(redis_client, tmp_path, redis_server.url, events, model, split=True, overlapped=overlapped)
    assert _state(redis_client) == expected


def test_overlapped_batches_on_a_cluster_leave_the_one_script_state(
    redis_cluster, cluster_client: redis.Redis, reference, tmp_path: Path
) -> None:
    events, model, expected = reference
    set_categories(cluster_client, CATEGORIES)
    _apply(cluster_client, tmp_path, redis_cluster.url, events, model, overlapped=True)
    assert _state(cluster_client) == expected


def test_redelivered_events_on_a_cluster_count_once(
    redis_cluster, cluster_client: redis.Redis, reference, tmp_path: Path
) -> None:
    events, model, expected = reference
    set_categories(cluster_client, CATEGORIES)
    # Every batch delivered twice, and then everything once more in one batch.
    doubled = [e for start in range(0, len(events), 40) for e in events[start : start + 40] * 2]
    _apply(cluster_client, tmp_path, redis_cluster.url, doubled, model, batch=80)
    _apply(cluster_client, tmp_path, redis_cluster.url, events, model, batch=len(events))
    assert _state(cluster_client) == expected


@pytest.mark.parametrize("groups_done", [0, 1, 3])
def test_a_crash_between_the_person_and_the_group_calls_loses_and_doubles_nothing(
    redis_cluster, cluster_client: redis.Redis, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    groups_done: int,
) -> None:  # fmt: skip
    events, model, expected = reference
    set_categories(cluster_client, CATEGORIES)
    real_group_calls = effects._group_calls

    def crash_after_some_groups(planned, speed):  # the process dies after `groups_done` group calls
        calls = real_group_calls(planned, speed)
        assert len(calls) > groups_done
        for keys, args, _ in calls[:groups_done]:
            cluster_client.evalsha(effects.APPLY_GLOBALS.sha, len(keys), *keys, *args)
        raise ConnectionError("killed between the calls")

    first, rest = events[:80], events[80:]
    _apply(cluster_client, tmp_path, redis_cluster.url, events[:40], model)
    monkeypatch.setattr(effects, "_group_calls", crash_after_some_groups)
    with pytest.raises(ConnectionError):
        _apply(cluster_client, tmp_path, redis_cluster.url, first[40:], model)
    monkeypatch.undo()
    # The batch was not acknowledged: it comes again, then the stream goes on.
    _apply(cluster_client, tmp_path, redis_cluster.url, first[40:], model)
    _apply(cluster_client, tmp_path, redis_cluster.url, rest, model)
    assert _state(cluster_client) == expected



def _read(
    client: redis.Redis, person: str, session: str | None, now_s: float, flags: ItemFlagsCopy | None = None
) -> dict[str, object]:
    state = read_speed_state(
        client, person, session_id=session, model_version="v1", top_categories=2, categories=["c1"],
        candidate_items=list(CATEGORIES), now_s=now_s, neighbours=NeighbourQuery(sample=50, k=20, n=10, per_item=30),
        flags=flags,
    )  # fmt: skip
    fields = {k: v for k, v in vars(state).items() if k not in ("delta", "day_counts")}
    fields["delta"] = None if state.delta is None else np.round(state.delta, 5).tolist()
    fields["day_counts"] = state.day_counts.tolist()
    # Sums of the same increments, in another order where the calls are grouped per person (last bits).
    fields["category_affinity"] = _near(state.category_affinity)
    fields["covisitation"] = {i: _near(row) for i, row in state.covisitation.items()}
    fields["category_bestsellers"] = {c: _near(row) for c, row in state.category_bestsellers.items()}
    return fields


def _near(row: dict[str, float]) -> dict[str, float]:
    return {k: Near(v) for k, v in row.items()}


def test_serving_reads_the_same_state_from_a_cluster_as_from_one_redis(
    redis_cluster, cluster_client: redis.Redis, redis_client: redis.Redis, reference, tmp_path: Path
) -> None:
    events, model, _ = reference
    set_categories(cluster_client, CATEGORIES)
    _apply(cluster_client, tmp_path, redis_cluster.url, events, model)
    for client in (cluster_client, redis_client):
        apply_item_updates(client, [ItemUpdate(item_id="i3", in_stock=False), ItemUpdate(item_id="i4", promoted=True)])
    single_flags, cluster_flags = ItemFlagsCopy(), ItemFlagsCopy()  # each read after the first uses its copy
    now_s = max(e.ts.timestamp() for e in events)
    reads = [
        (person, session)
        for person in ("u1", "u2", "u3", "guest", "nobody")
        for session in (None, *sorted({e.session_id for e in events if e.anonymous_id == person}))
    ]
    compared = 0
    for person, session in reads:
        single = _read(redis_client, person, session, now_s, single_flags)
        cluster = _read(cluster_client, person, session, now_s, cluster_flags)
        assert cluster == single, (person, session)
        compared += bool(single["neighbours"]) + bool(single["covisitation"])
    assert compared > 5  # the reads followed sessions to co-visits and neighbours
    assert cluster_flags.flags.out_of_stock == {"i3"} and cluster_flags.flags.promoted == {"i4"}
    apply_item_updates(cluster_client, [ItemUpdate(item_id="i5", in_stock=False)])
    assert _read(cluster_client, "u1", None, now_s, cluster_flags)["out_of_stock"] == {"i3", "i5"}


def test_a_master_killed_mid_stream_fails_over_and_the_counts_stay_exact(
    redis_cluster: LocalRedisCluster, cluster_client: redis.Redis, reference, tmp_path: Path
) -> None:
    events, model, expected = reference
    set_categories(cluster_client, CATEGORIES)
    settings = speed_settings(tmp_path, redis_cluster.url, negatives=0, script_chunk=7)
    now_s = max(e.ts.timestamp() for e in events)
    # The master holding the trending group: every batch writes it.
    victim_port = cluster_client.get_node_from_key(redis_keys.TRENDING_TOP).port  # type: ignore[attr-defined]
    victim = next(node for node in redis_cluster.nodes if node.port == victim_port)
    client, applier = cluster_client, Applier(cluster_client, settings)
    retried = 0
    try:
        for number, start in enumerate(range(0, len(events), 20)):
            if number == 3:
                victim.kill()  # kill -9 between batches: the acknowledged ones must be on its replica
            deadline = time.monotonic() + 90
            while True:  # the batch stays pending until applied: a consumer would retry it the same way
                try:
                    if applier is None:  # a restarted consumer: a new client learns the new slot map
                        client = connect(redis_cluster.url, timeout_s=5)
                        applier = Applier(client, settings)
                    result = applier.apply(events[start : start + 20], [model], now_s=now_s)
                    break
                except (redis.RedisError, RedisClusterException):
                    assert time.monotonic() < deadline, "the cluster did not fail over within 90 s"
                    retried += 1
                    applier = None
                    time.sleep(0.5)
            assert not result.failed and not result.unresolved
        assert retried > 0  # the kill was seen
        assert _state(client) == expected
        assert client.get_node_from_key(redis_keys.TRENDING_TOP).port != victim_port  # type: ignore[attr-defined]
    finally:  # the session's cluster must be whole for the tests after this one, pass or fail
        victim.start()  # it rejoins as a replica of its old replica (a no-op if it still answers)
        redis_cluster.wait_ok()


def _identify_events(rng: np.random.Generator, declined: bool) -> list[Event]:
    """The chunk test's sessions where the guest's device logs in as u2 part way (batch 40-79): the
    device's sessions, items, purchases and markers merge into u2's, a session both have included."""
    events = _events(rng, 100, declined=declined)
    at = 60
    session, ts = f"s-guest-{at // 25}", events[at].ts
    both = make_event(EventType.VIEW, "i2", anonymous_id="guest", user_id="u2", session_id=session, ts=ts, received_at=ts)
    login = make_event(EventType.IDENTIFY, None, anonymous_id="guest", user_id="u2", session_id=session, ts=ts, received_at=ts)
    return [*events[:at], both, login, *events[at:]]


def _merged_state(client: redis.Redis) -> dict[str, object]:
    state = _state(client)
    # The user's devices are scored by Redis' clock at the merge: which devices, not when.
    return {k: sorted(v) if redis_keys.family_of(k) == "person_devices" else v for k, v in state.items()}  # type: ignore[call-overload]


# With the declined visitor the draws differ: a device event delivered again after the login enters its
# session anew, and its session-kNN index must stay under the device's token (the plan keeps it).
@pytest.mark.parametrize("declined", [False, True], ids=["traffic", "traffic with a declined visitor"])
@pytest.mark.parametrize("crash", ["none", "delivered twice", "after the detach", "after the merge"])
def test_an_identify_on_a_cluster_merges_as_on_one_redis_exactly_once(
    redis_server: RedisServer, redis_client: redis.Redis, redis_cluster, cluster_client: redis.Redis, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, crash: str, declined: bool,
) -> None:  # fmt: skip
    rng = np.random.default_rng(5)
    model = _publish_v1(tmp_path, rng)
    events = _identify_events(rng, declined)
    # The identify is in the second batch. A batch delivered again after the merge teaches the user's delta
    # the device's earlier events (their delta markers are not carried), on one Redis too: same deliveries.
    batches = [events[:40], events[40:80], *([events[40:80]] if crash == "delivered twice" else []), events[80:]]
    set_categories(redis_client, CATEGORIES)
    for batch in batches:  # the one-script merge on a single Redis
        _apply(redis_client, tmp_path, redis_server.url, batch, model)
    assert redis_client.get(redis_keys.alias("guest")) == b"u2" and not redis_client.exists(redis_keys.person_items("guest"))
    expected = _merged_state(redis_client)

    set_categories(cluster_client, CATEGORIES)
    url = redis_cluster.url
    _apply(cluster_client, tmp_path, url, batches[0], model)
    if crash.startswith("after"):
        real_merge = Applier._merge

        def merge_then_die(self, event, user, device, sessions, stash):  # the process dies around the merge
            if crash == "after the merge":
                assert real_merge(self, event, user, device, sessions, stash)
            raise ConnectionError(f"killed {crash}")

        monkeypatch.setattr(Applier, "_merge", merge_then_die)
        with pytest.raises(ConnectionError):
            _apply(cluster_client, tmp_path, url, batches[1], model)
        monkeypatch.undo()
        login = next(e for e in events if e.event_type is EventType.IDENTIFY)
        assert cluster_client.exists(redis_keys.identify_stash("guest", login.event_id))  # waits for the retry
        assert not cluster_client.exists(redis_keys.person_items("guest"), redis_keys.alias("guest"))
    for batch in batches[1:]:  # an unacknowledged batch comes again, then the stream goes on
        _apply(cluster_client, tmp_path, url, batch, model)
    assert _merged_state(cluster_client) == expected


def test_a_device_event_retried_after_its_identify_gets_its_plan_from_the_user(
    redis_cluster, cluster_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The device's events died between their person call and their group calls; the identify came first.
    settings = speed_settings(tmp_path, redis_cluster.url)
    browse = [make_event(EventType.VIEW, item, anonymous_id="dev", session_id="s1") for item in ("i1", "i2")]
    login = make_event(EventType.IDENTIFY, None, anonymous_id="dev", user_id="u9", session_id="s1")

    def die(planned, speed):
        raise ConnectionError("killed between the calls")

    monkeypatch.setattr(effects, "_group_calls", die)
    with pytest.raises(ConnectionError):
        Applier(cluster_client, settings).apply(browse, [])
    monkeypatch.undo()
    assert Applier(cluster_client, settings).apply([login], []).applied == 1
    retried = Applier(cluster_client, settings).apply(browse, [])  # now the user's, and duplicates there
    assert retried.duplicates == 2
    assert int(cluster_client.hget(redis_keys.covisitation("i1"), "i2")) == FOLLOW_UNIT  # the carried plan's co-visit


def test_reads_of_ids_in_several_slots_work_on_a_cluster(cluster_client: redis.Redis) -> None:
    # Tombstones and aliases of many ids live in many slots: read per node, not as one MGET.
    ids = [f"person-{j}" for j in range(20)]
    cluster_client.set(redis_keys.erased(ids[3]), 1)
    cluster_client.set(redis_keys.erased(ids[17]), 1)
    assert redis_keys.erased_among(cluster_client, ids) == {ids[3], ids[17]}
    assert len({cluster_client.keyslot(redis_keys.erased(i)) for i in ids}) > 1  # type: ignore[attr-defined]
