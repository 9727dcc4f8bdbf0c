"""Live pushes on real Redis: one subscription per worker fanned out by person and session, a slot of one
list per stream, and the WebSocket beside SSE (the real API under uvicorn, a real speed consumer)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY
from websockets.exceptions import ConnectionClosedOK, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from bench.serve import SyntheticModel
from common import redis_keys
from common.lake import Lake
from common.messages import RecsChanged, RecsChangedBatch
from common.redis_server import RedisServer, free_port
from common.settings import Settings
from serving.core.push import PUSH_DEFER_S, Fanout, LiveStream, PushedList, StreamEnded, stream_keys
from serving.main import create_app
from speed_layer.consumer import SpeedConsumer
from tests.speed_factories import set_categories
from tests.test_serving_support import KEYS, SHOP_KEY, TOKEN_SECRET, make_settings, view_event
from tests.test_serving_tokens import claims, signed

pytest_plugins = ["tests.test_serving_support"]

WAIT_S = 20.0  # a bound on waiting for what must come, never a figure asserted


# ---------------------------------------------------------------- the fan-out, on its own


class Recorder:
    """A stream's compute: counts its lists and says so, so a test can wait for the nth. Each list is new
    to the client unless `content` is set: then every list has that content."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lists = 0
        self.changed = asyncio.Event()
        self.content: object = None

    async def __call__(self) -> PushedList:
        self.lists += 1
        self.changed.set()
        body = f"{self.name}-{self.lists}"
        return PushedList(body, content=body if self.content is None else self.content)

    async def wait_for(self, n: int) -> None:
        while self.lists < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT_S)


def announcement(*changed: tuple[str, str | None]) -> str:
    """The speed layer's message for a batch that changed these (person, session)s."""
    changes = [RecsChanged(person_id=p, session_id=s, event_type="view", item_id="i1") for p, s in changed]
    return RecsChangedBatch(changes=changes).model_dump_json()


def publish(client: redis.Redis, person: str, session: str | None) -> None:
    client.publish(redis_keys.RECS_CHANNEL, announcement((person, session)))


def open_stream(fanout: Fanout, name: str, people: list[str], session: str | None) -> tuple[LiveStream, Recorder]:
    recorder = Recorder(name)
    stream = LiveStream(stream_keys(people, session), recorder, transport="test")
    fanout.open(stream)
    return stream, recorder


def test_a_message_reaches_only_the_streams_of_its_person_or_session(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        a, rec_a = open_stream(fanout, "a", ["dev-a"], "s-a")
        b, rec_b = open_stream(fanout, "b", ["dev-b"], "s-b")
        c, rec_c = open_stream(fanout, "c", ["u-c", "dev-c"], "s-c")
        marker, rec_marker = open_stream(fanout, "marker", ["dev-m"], None)
        try:
            assert [(await s.next()).body for s in (a, b, c, marker)] == ["a-1", "b-1", "c-1", "marker-1"]
            assert redis_client.pubsub_numsub(redis_keys.RECS_CHANNEL) == [(redis_keys.RECS_CHANNEL.encode(), 1)]

            async def after(person: str, session: str | None) -> None:
                # Lists are computed in the order streams are marked: once the marker's list (marked
                # by a later message) is made, every stream the first message marked has its list.
                publish(redis_client, person, session)
                publish(redis_client, "dev-m", None)
                await rec_marker.wait_for(rec_marker.lists + 1)

            await after("dev-a", "s-a")  # its person and session: one list
            assert (rec_a.lists, rec_b.lists, rec_c.lists) == (2, 1, 1)
            assert (await a.next()).body == "a-2"
            await after("someone-else", "s-b")  # its session only (another device of the session)
            assert (rec_a.lists, rec_b.lists, rec_c.lists) == (2, 2, 1)
            await after("u-c", None)  # its user, with no session
            await after("dev-c", "s-other")  # its device, in another session
            assert (rec_a.lists, rec_b.lists, rec_c.lists) == (2, 2, 3)
            await after("dev-z", "s-z")  # nobody's
            assert (rec_a.lists, rec_b.lists, rec_c.lists) == (2, 2, 3)

            fanout.close(b)
            await after("dev-b", "s-b")  # a closed stream is out of the index
            assert rec_b.lists == 2 and fanout.open_streams == 3
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_one_message_marks_the_streams_of_every_person_it_names_once(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        streams = [open_stream(fanout, name, [f"dev-{name}"], f"s-{name}") for name in ("a", "b", "c")]
        (a, rec_a), (b, rec_b), (_, rec_c) = streams
        try:
            assert [(await s.next()).body for s, _ in streams] == ["a-1", "b-1", "c-1"]
            # a by its person and again by its session, b by its person; c not named
            assert fanout.dispatch(announcement(("dev-a", "s-a"), ("dev-b", None), ("dev-x", "s-a"))) == 2
            assert (await asyncio.wait_for(a.next(), WAIT_S)).body == "a-2"
            assert (await asyncio.wait_for(b.next(), WAIT_S)).body == "b-2"
            assert (rec_a.lists, rec_b.lists, rec_c.lists) == (2, 2, 1)
            single = RecsChanged(person_id="dev-c", session_id="s-c", event_type="view").model_dump_json()
            assert fanout.dispatch(single) == 0  # not a batch: malformed, ignored
            assert fanout.dispatch(b"{not json") == 0
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_closing_a_stream_twice_or_one_never_opened_counts_nothing(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        before = REGISTRY.get_sample_value("recs_push_streams", {"transport": "test"}) or 0.0
        never = LiveStream(stream_keys(["dev-n"], None), Recorder("never"), transport="test")
        fanout.close(never)  # a WebSocket refused or gone before its stream opened
        stream, _ = open_stream(fanout, "a", ["dev-a"], "s-a")
        fanout.close(stream)
        fanout.close(stream)  # the route's finally after the stream's own end
        assert fanout.open_streams == 0
        assert REGISTRY.get_sample_value("recs_push_streams", {"transport": "test"}) == before
        await fanout.aclose()

    asyncio.run(scenario())


def dropped() -> float:
    return REGISTRY.get_sample_value("recs_push_dropped_total", {"transport": "test"}) or 0.0


def test_a_slow_clients_slot_holds_only_the_latest_list(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        slow, recorder = open_stream(fanout, "slow", ["dev-slow"], "s-slow")
        before = dropped()
        try:
            await recorder.wait_for(1)
            for n in (2, 3, 4):  # the client takes none of them
                publish(redis_client, "dev-slow", "s-slow")
                await recorder.wait_for(n)
            assert (await slow.next()).body == "slow-4"  # the latest, and only it
            assert dropped() - before == 3
            publish(redis_client, "dev-slow", "s-slow")
            assert (await asyncio.wait_for(slow.next(), WAIT_S)).body == "slow-5"  # a reading client misses none
            assert dropped() - before == 3
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def counted(name: str, transport: str | None = None) -> float:
    labels = {"transport": transport} if transport else {}
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_changes_during_a_computation_coalesce_into_one_list_of_the_latest_state(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        gate = asyncio.Event()
        computing = asyncio.Event()
        lists: list[str] = []

        async def compute() -> PushedList:
            # The state the list is computed from, read as it starts (as the recommender reads Redis), then
            # the computation takes as long as the test holds the gate.
            body = f"state-{int(redis_client.get('state-of-s1') or 0)}"
            lists.append(body)
            computing.set()
            await gate.wait()
            return PushedList(body, content=body)

        stream = LiveStream(stream_keys(["dev-1"], "s1"), compute, transport="test")
        fanout.open(stream)
        marker, _ = open_stream(fanout, "marker", ["dev-m"], None)
        coalesced = counted("recs_push_coalesced_total")
        try:
            await asyncio.wait_for(computing.wait(), WAIT_S)  # its first list is being computed
            for n in range(1, 6):  # five changes while it is
                redis_client.set("state-of-s1", n)
                publish(redis_client, "dev-1", "s1")
            # The first marks the stream again, the other four join that mark.
            deadline = time.monotonic() + WAIT_S
            while counted("recs_push_coalesced_total") - coalesced < 4:
                assert time.monotonic() < deadline, "the changes did not all arrive"
                await asyncio.sleep(0.01)
            gate.set()
            assert (await asyncio.wait_for(stream.next(), WAIT_S)).body == "state-0"
            assert (await asyncio.wait_for(stream.next(), WAIT_S)).body == "state-5"  # the latest state
            # Lists are computed in the order marked: once the marker's is made, nothing else was left.
            publish(redis_client, "dev-m", None)
            await asyncio.wait_for(marker.next(), WAIT_S)
            await asyncio.wait_for(marker.next(), WAIT_S)
            assert lists == ["state-0", "state-5"]  # two computations for the first list and five changes
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_streams_of_the_same_request_share_one_computation(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        recorder = Recorder("shared")
        tabs = [LiveStream(stream_keys(["dev-1"], "s1"), recorder, "test", request=("dev-1", "s1", 10)) for _ in "ab"]
        other = LiveStream(stream_keys(["dev-1"], "s1"), Recorder("k5"), "test", request=("dev-1", "s1", 5))
        for stream in (*tabs, other):
            fanout.open(stream)
        try:
            assert [(await s.next()).body for s in (*tabs, other)] == ["shared-1", "shared-1", "k5-1"]
            publish(redis_client, "dev-1", "s1")
            assert [(await s.next()).body for s in (*tabs, other)] == ["shared-2", "shared-2", "k5-2"]
            assert recorder.lists == 2
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_a_list_equal_to_the_last_one_sent_is_not_pushed(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        stream, recorder = open_stream(fanout, "a", ["dev-a"], "s-a")
        recorder.content = "the same items"
        unchanged = counted("recs_push_unchanged_total", "test")
        try:
            assert (await stream.next()).body == "a-1"
            publish(redis_client, "dev-a", "s-a")
            await recorder.wait_for(2)  # computed, equal to the list sent: not pushed
            assert counted("recs_push_unchanged_total", "test") - unchanged == 1
            recorder.content = None
            publish(redis_client, "dev-a", "s-a")
            assert (await asyncio.wait_for(stream.next(), WAIT_S)).body == "a-3"  # the next list that differs
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_a_push_waits_for_the_requests_in_flight_but_not_past_its_slack(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        stream, recorder = open_stream(fanout, "a", ["dev-a"], "s-a")
        try:
            await stream.next()
            fanout.requests.enter()  # a request in flight
            publish(redis_client, "dev-a", "s-a")
            await asyncio.sleep(PUSH_DEFER_S / 3)
            assert recorder.lists == 1  # waiting for the request
            fanout.requests.leave()
            assert (await asyncio.wait_for(stream.next(), WAIT_S)).body == "a-2"
            fanout.requests.enter()  # a request that never ends (or a worker that is never idle)
            publish(redis_client, "dev-a", "s-a")
            assert (await asyncio.wait_for(stream.next(), WAIT_S)).body == "a-3"  # computed once its slack is spent
            fanout.requests.leave()
        finally:
            await fanout.aclose()

    asyncio.run(scenario())


def test_streams_end_with_an_error_when_redis_is_lost(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        fanout = Fanout(redis_server.url)
        stream, _ = open_stream(fanout, "a", ["dev-a"], "s-a")
        try:
            assert (await stream.next()).body == "a-1"
            redis_server.stop()  # the real server, killed
            with pytest.raises(StreamEnded) as ended:
                await asyncio.wait_for(stream.next(), WAIT_S)
            assert ended.value.error.error == "redis_unavailable"
            assert fanout.open_streams == 0
        finally:
            await fanout.aclose()
            redis_server.start()

    asyncio.run(scenario())


# ---------------------------------------------------------------- SSE and WebSocket on the real API


@contextmanager
def api_and_consumer(settings: Settings, redis_server: RedisServer) -> Iterator[tuple[str, FastAPI]]:
    """The API under uvicorn and a speed-layer consumer, both in threads of this process: the API's host
    and port, and its app."""
    client = redis_server.client()
    catalog = Lake(settings.lake.root).read_catalog().to_pylist()
    set_categories(client, {row["item_id"]: row["category"] for row in catalog})
    stop = threading.Event()
    speed = threading.Thread(
        target=SpeedConsumer(redis_server.client(), settings, name="push-test").run, args=(stop,), daemon=True
    )
    speed.start()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    api = threading.Thread(target=server.run, daemon=True)
    api.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert api.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        api.join(timeout=10)
        stop.set()
        speed.join(timeout=5)
        client.close()


@pytest.fixture
def live_api(published: SyntheticModel, recs_env: Path, redis_server: RedisServer) -> Iterator[str]:
    """The API (keys and session tokens on) and a speed-layer consumer."""
    with api_and_consumer(make_settings(keys=KEYS, token_secret=TOKEN_SECRET), redis_server) as (host, _):
        yield host


PARAMS = "anonymous_id=a1&session_id=s1&k=5"


@contextmanager
def websocket(host: str, query: str, headers: dict[str, str] | None = None) -> Iterator[ClientConnection]:
    with connect(f"ws://{host}/v1/stream/recommendations/ws?{query}", additional_headers=headers, open_timeout=WAIT_S) as ws:
        yield ws


def ws_message(ws: ClientConnection) -> tuple[str, dict[str, Any]]:
    message = json.loads(ws.recv(timeout=WAIT_S))
    return message["event"], message["data"]


def sse_messages(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    name = None
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name is not None:
            yield name, json.loads(line.split(":", 1)[1])
            name = None


def without_request_id(event: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    name, data = event
    return name, {field: value for field, value in data.items() if field != "request_id"}


def streams_open(http: httpx.Client) -> dict[str, int]:
    """The open streams of the API's transports, from /metrics."""
    counts = dict.fromkeys(("sse", "websocket"), 0)
    for line in http.get("/metrics", headers={"X-API-Key": SHOP_KEY}).text.splitlines():
        if line.startswith("recs_push_streams{"):
            transport = line.split('"')[1]
            if transport in counts:
                counts[transport] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_the_websocket_gets_the_same_messages_as_sse(live_api: str) -> None:
    shop = {"X-API-Key": SHOP_KEY}
    with httpx.Client(base_url=f"http://{live_api}", timeout=WAIT_S) as http:
        with (
            http.stream("GET", f"/v1/stream/recommendations?{PARAMS}", headers=shop) as sse,
            websocket(live_api, PARAMS, headers=shop) as ws,
        ):
            assert sse.status_code == 200
            sse_events = sse_messages(sse)
            first = without_request_id(ws_message(ws))
            assert first[0] == "recommendations" and first == without_request_id(next(sse_events))
            assert streams_open(http) == {"sse": 1, "websocket": 1}

            # A view in a new category through the API and the real speed consumer: both get the new list.
            event = view_event("a1", "i5")
            assert http.post("/v1/events", json=event, headers=shop).status_code == 202
            second = without_request_id(ws_message(ws))
            assert second == without_request_id(next(sse_events))
            assert second[0] == "recommendations" and second != first
        deadline = time.monotonic() + WAIT_S
        while sum(streams_open(http).values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert streams_open(http) == {"sse": 0, "websocket": 0}  # both closed by their clients, unindexed


def test_the_websocket_takes_a_key_or_a_session_token_and_refuses_without(live_api: str) -> None:
    refusals = {
        "": (401, "missing_api_key"),
        "&access_token=lrt1.forged.token": (401, "invalid_token"),
        f"&access_token={signed(claims(session_id='s2'))}": (403, "token_scope"),
    }
    for credential, (status, error) in refusals.items():
        with pytest.raises(InvalidStatus) as refused, websocket(live_api, PARAMS + credential):
            pass
        assert refused.value.response.status_code == status, credential
        assert json.loads(refused.value.response.body or b"{}")["error"] == error, credential
    with pytest.raises(InvalidStatus) as storefront_key, websocket(live_api, PARAMS, {"X-API-Key": "key-storefront-0001"}):
        pass
    assert storefront_key.value.response.status_code == 403  # events:write only

    with websocket(live_api, PARAMS, {"Authorization": "Bearer key-reader-0002"}) as ws:
        assert ws_message(ws)[0] == "recommendations"
    short = signed(claims(expires_at=int(time.time()) + 5))  # time for the first list on a loaded machine
    with websocket(live_api, f"{PARAMS}&access_token={short}") as ws:
        assert ws_message(ws)[0] == "recommendations"
        name, data = ws_message(ws)
        assert (name, data["error"]) == ("token_expired", "token_expired")
        with pytest.raises(ConnectionClosedOK):  # then the server closes
            ws.recv(timeout=WAIT_S)


def test_requests_are_answered_while_pushes_queue(
    published: SyntheticModel, recs_env: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real app under uvicorn in this loop; ten streams' lists queue, each holding the loop 20 ms as a
    list's CPU does. A GET and a POST whose body comes 60 ms after its headers (a request waiting mid-way)
    are answered before the queue drains, and no list starts while either is in flight."""
    # The slack after which a list goes ahead anyway has its own test; on a loaded machine the cold app's
    # first GET alone can outlast it.
    monkeypatch.setattr("serving.core.push.PUSH_DEFER_S", 60.0)

    async def scenario() -> None:
        app = create_app(make_settings())
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "the API did not start"
            await asyncio.sleep(0.01)
        fanout: Fanout = app.state.push
        in_flight_at_start: list[int] = []

        async def slow() -> PushedList:
            in_flight_at_start.append(fanout.requests.count)
            time.sleep(0.02)  # noqa: ASYNC251 - the point: a list computed on the loop holds it
            return PushedList(str(len(in_flight_at_start)), content=len(in_flight_at_start))

        streams = [LiveStream(stream_keys([f"dev-{n}"], None), slow, "test") for n in range(10)]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.config.port)
        try:
            for stream in streams:
                fanout.open(stream)  # ten first lists queue
            writer.write(b"GET /v1/recommendations?anonymous_id=a1&session_id=s1 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            lists_when_answered = [len(in_flight_at_start)]
            await _skip_response(reader)
            body = json.dumps(view_event("a1", "i5")).encode()
            writer.write(b"POST /v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(body))
            await asyncio.sleep(0.06)
            writer.write(body)
            assert (await reader.readline()).startswith(b"HTTP/1.1 202")
            lists_when_answered.append(len(in_flight_at_start))
            for stream in streams:
                await asyncio.wait_for(stream.next(), WAIT_S)
            assert max(lists_when_answered) < len(streams)  # answered before the queue drained
            assert in_flight_at_start == [0] * len(streams)  # no list computed while either was in flight
        finally:
            writer.close()
            server.should_exit = True
            await asyncio.wait_for(serving, WAIT_S)

    asyncio.run(scenario())


async def _skip_response(reader: asyncio.StreamReader) -> None:
    """The rest of a response after its status line: headers, then a body of Content-Length bytes."""
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)


def test_an_unchanged_list_is_not_pushed_on_the_real_api(live_api: str, redis_server: RedisServer) -> None:
    shop = {"X-API-Key": SHOP_KEY}
    client = redis_server.client()
    unchanged = counted("recs_push_unchanged_total", "sse")
    with httpx.Client(base_url=f"http://{live_api}", timeout=WAIT_S) as http:
        with http.stream("GET", f"/v1/stream/recommendations?{PARAMS}", headers=shop) as sse:
            events = sse_messages(sse)
            first = without_request_id(next(events))
            publish(client, "a1", "s1")  # "changed", but nothing the list reads did
            deadline = time.monotonic() + WAIT_S
            while counted("recs_push_unchanged_total", "sse") == unchanged:
                assert time.monotonic() < deadline, "the list was not recomputed"
                time.sleep(0.02)
            assert http.post("/v1/events", json=view_event("a1", "i5"), headers=shop).status_code == 202
            second = without_request_id(next(events))  # the next event is the changed list, not a copy
            assert second != first
    client.close()


def test_openapi_documents_the_websocket_in_the_sse_route(client: Any) -> None:
    sse = client.get("/openapi.json").json()["paths"]["/v1/stream/recommendations"]["get"]
    assert "/v1/stream/recommendations/ws" in sse["description"] and "latest list" in sse["description"]
