"""SSE and WebSocket streams, served for real by Hypercorn on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio
import websockets
from httpx_sse import aconnect_sse
from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, jsonify, request, websocket

from server.api.streams import (
    parse_event_filter,
    parse_last_event_id,
    sse_response,
    websocket_session,
)
from server.errors import UserError
from server.events.encoders import sse_comment, sse_frame, ws_json
from server.events.hub import EventHub
from server.events.types import Event, EventFilter, EventType

TEST_TIMEOUT_S = 10.0
HEARTBEAT_S = 0.2


def build_app(hub: EventHub) -> Quart:
    app = Quart(__name__)

    @app.get("/events")
    async def events():
        event_filter = parse_event_filter(request.args)
        last_event_id = parse_last_event_id(request.headers, request.args)
        return await sse_response(hub, event_filter, last_event_id, heartbeat_s=HEARTBEAT_S)

    @app.get("/jobs/<job_id>/events")
    async def job_events(job_id: str):
        last_event_id = parse_last_event_id(request.headers, request.args)
        return await sse_response(
            hub,
            EventFilter(job_ids=frozenset({job_id})),
            last_event_id,
            heartbeat_s=HEARTBEAT_S,
            end_on_terminal_job=job_id,
        )

    @app.websocket("/ws")
    async def ws():
        await websocket_session(hub, websocket)

    @app.errorhandler(UserError)
    async def user_error(error: UserError):
        return jsonify({"message": error.message, "field": error.field}), error.status

    return app


@dataclass
class LiveServer:
    hub: EventHub
    base_url: str
    ws_url: str
    stop: asyncio.Event
    task: asyncio.Task


def bind_loopback_socket() -> tuple[int, int]:
    """Bind a free loopback port and return (file descriptor, port) for Hypercorn's fd:// bind."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    return sock.detach(), port


async def wait_until(condition, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def server() -> AsyncIterator[LiveServer]:
    hub = EventHub(coalesce_interval_s=0.0)
    fd, port = bind_loopback_socket()
    config = Config()
    config.bind = [f"fd://{fd}"]
    # Far longer than any test waits: streams must end through hub.close(), not this timeout.
    config.graceful_timeout = 30.0
    config.accesslog = None
    stop = asyncio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()
        await hub.close()

    task = asyncio.create_task(serve(build_app(hub), config, shutdown_trigger=shutdown_trigger))
    await wait_until(lambda: _port_accepts(port), timeout_s=5.0)
    live = LiveServer(hub, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws", stop, task)
    try:
        yield live
    finally:
        stop.set()
        await asyncio.wait_for(task, TEST_TIMEOUT_S)


def http_client(server: LiveServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.base_url, timeout=TEST_TIMEOUT_S)


def _port_accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def next_envelopes(messages: AsyncIterator, count: int) -> list[dict]:
    """Parse the data of the next `count` messages of one `aiter_sse()` iterator."""
    return [json.loads((await anext(messages)).data) for _ in range(count)]


async def receive_json(connection) -> dict:
    return json.loads(await asyncio.wait_for(connection.recv(), 2.0))


def test_sse_frame_writes_non_finite_floats_as_null():
    data = {"loss": float("nan"), "x": [float("inf")]}
    event = Event(9, "job.metrics", 1.5, job_id="j", data=data)

    frame = sse_frame(event).decode()

    assert frame.startswith("id: 9\ndata: ")
    assert frame.endswith("\n\n")
    envelope = json.loads(frame.split("data: ", 1)[1])  # strict JSON: no NaN token
    assert envelope["data"] == {"loss": None, "x": [None]}


def test_sse_comment_stays_on_one_line():
    assert sse_comment("a\nb") == b": a b\n\n"


def test_ws_json_wraps_the_envelope():
    event = Event(3, "job.started", 2.0, job_id="j", data={"k": "v"})

    message = json.loads(ws_json(event, "ref"))

    assert message == {"op": "event", "subscription": "ref", "event": event.to_dict()}


async def test_sse_frames_carry_id_and_one_line_json(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with client.stream("GET", "/events", params={"types": "job.*"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-accel-buffering"] == "no"

            server.hub.publish(EventType.MODEL_CREATED, {}, model_id="m")  # filtered out
            server.hub.publish(
                EventType.JOB_FAILED, {"error": {"message": "line one\nline two"}}, job_id="j"
            )
            text = ""
            async for chunk in response.aiter_text():
                text += chunk
                if text.endswith("\n\n") and "data:" in text:
                    break

    lines = text.split("\n")
    assert lines[0] == "id: 2"
    assert lines[1].startswith("data: ")
    assert lines[2:] == ["", ""]
    assert not any(line.startswith("event:") for line in lines)
    envelope = json.loads(lines[1][len("data: "):])
    assert envelope["id"] == 2
    assert envelope["type"] == "job.failed"
    assert envelope["job_id"] == "j"
    assert envelope["data"] == {"error": {"message": "line one\nline two"}}


async def test_sse_parsed_by_httpx_sse_as_plain_messages(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with aconnect_sse(client, "GET", "/events", params={"job": "j1,j2"}) as source:
            server.hub.publish(EventType.JOB_QUEUED, {}, job_id="j1")
            server.hub.publish(EventType.JOB_QUEUED, {}, job_id="other")
            server.hub.publish(EventType.JOB_QUEUED, {}, job_id="j2")
            messages = []
            async for message in source.aiter_sse():
                messages.append(message)
                if len(messages) == 2:
                    break

    assert [message.event for message in messages] == ["message", "message"]
    assert [message.id for message in messages] == ["1", "3"]
    assert [json.loads(message.data)["job_id"] for message in messages] == ["j1", "j2"]


async def test_sse_resumes_after_last_event_id_header(server):
    for _ in range(5):
        server.hub.publish(EventType.JOB_PHASE, {}, job_id="j")

    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        headers = {"Last-Event-ID": "2"}
        async with aconnect_sse(client, "GET", "/events", headers=headers) as source:
            messages = source.aiter_sse()
            replayed = await next_envelopes(messages, 3)
            server.hub.publish(EventType.JOB_PHASE, {}, job_id="j")
            live = await next_envelopes(messages, 1)

    assert [envelope["id"] for envelope in replayed] == [3, 4, 5]
    assert [envelope["id"] for envelope in live] == [6]


async def test_sse_resumes_after_last_event_id_query_parameter(server):
    for _ in range(3):
        server.hub.publish(EventType.JOB_PHASE, {}, job_id="j")

    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        params = {"last_event_id": "1"}
        async with aconnect_sse(client, "GET", "/events", params=params) as source:
            replayed = await next_envelopes(source.aiter_sse(), 2)

    assert [envelope["id"] for envelope in replayed] == [2, 3]


@pytest.mark.parametrize(
    ("headers", "params", "field"),
    [
        ({"Last-Event-ID": "abc"}, {}, "Last-Event-ID"),
        ({"Last-Event-ID": "-1"}, {}, "Last-Event-ID"),
        ({}, {"last_event_id": "1.5"}, "last_event_id"),
        ({}, {"types": "job.bogus"}, "types"),
        ({}, {"types": "nothing.*"}, "types"),
    ],
)
async def test_sse_rejects_invalid_parameters_with_field(server, headers, params, field):
    async with http_client(server) as client:
        response = await client.get("/events", headers=headers, params=params)

    assert response.status_code == 400
    assert response.json()["field"] == field
    assert server.hub.subscriber_count == 0


async def test_sse_sends_heartbeat_comments_when_idle(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with client.stream("GET", "/events") as response:
            started = time.monotonic()
            first_chunk = await anext(response.aiter_text())
            waited_s = time.monotonic() - started

    assert first_chunk == ": heartbeat\n\n"
    assert waited_s < HEARTBEAT_S * 10


async def test_job_stream_ends_after_the_jobs_terminal_event(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with aconnect_sse(client, "GET", "/jobs/j1/events") as source:
            server.hub.publish(EventType.JOB_STARTED, {}, job_id="j1")
            server.hub.publish(EventType.JOB_STARTED, {}, job_id="j2")
            server.hub.publish(EventType.JOB_SUCCEEDED, {}, job_id="j1")
            server.hub.publish(EventType.JOB_SUCCEEDED, {}, job_id="j2")
            # The loop ends only if the server closes the response.
            envelopes = [json.loads(message.data) async for message in source.aiter_sse()]

    assert [(envelope["type"], envelope["job_id"]) for envelope in envelopes] == [
        ("job.started", "j1"),
        ("job.succeeded", "j1"),
    ]
    await wait_until(lambda: server.hub.subscriber_count == 0)


async def test_sse_client_disconnect_unsubscribes(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with client.stream("GET", "/events"):
            assert server.hub.subscriber_count == 1

    await wait_until(lambda: server.hub.subscriber_count == 0)


async def test_ws_ping_gets_pong(server):
    async with websockets.connect(server.ws_url) as connection:
        await connection.send(json.dumps({"op": "ping"}))

        assert await receive_json(connection) == {"op": "pong"}


async def test_ws_subscribe_receives_events_until_unsubscribe(server):
    server.hub.publish(EventType.MODEL_CREATED, {}, model_id="m")
    async with websockets.connect(server.ws_url) as connection:
        subscribe = {"op": "subscribe", "id": "a", "filter": {"job": ["j1"], "types": "job.*"}}
        await connection.send(json.dumps(subscribe))
        assert await receive_json(connection) == {"op": "subscribed", "id": "a", "last_event_id": 1}

        server.hub.publish(EventType.JOB_STARTED, {}, job_id="j2")
        server.hub.publish(EventType.JOB_STARTED, {"n": 1}, job_id="j1")
        message = await receive_json(connection)
        assert message["op"] == "event"
        assert message["subscription"] == "a"
        assert message["event"]["id"] == 3
        assert message["event"]["data"] == {"n": 1}

        await connection.send(json.dumps({"op": "unsubscribe", "id": "a"}))
        assert await receive_json(connection) == {"op": "unsubscribed", "id": "a"}
        server.hub.publish(EventType.JOB_SUCCEEDED, {}, job_id="j1")
        await connection.send(json.dumps({"op": "ping"}))
        assert await receive_json(connection) == {"op": "pong"}  # no event came in between
        assert server.hub.subscriber_count == 0


async def test_ws_subscribe_with_since_replays(server):
    for _ in range(3):
        server.hub.publish(EventType.JOB_PHASE, {}, job_id="j")

    async with websockets.connect(server.ws_url) as connection:
        await connection.send(json.dumps({"op": "subscribe", "id": 7, "since": 1}))
        assert (await receive_json(connection))["op"] == "subscribed"
        first = await receive_json(connection)
        second = await receive_json(connection)

    assert (first["subscription"], first["event"]["id"]) == (7, 2)
    assert (second["subscription"], second["event"]["id"]) == (7, 3)


async def test_ws_several_subscriptions_on_one_socket(server):
    async with websockets.connect(server.ws_url) as connection:
        for ref, job_id in (("first", "j1"), ("second", "j2")):
            await connection.send(
                json.dumps({"op": "subscribe", "id": ref, "filter": {"job": job_id}})
            )
            assert (await receive_json(connection))["op"] == "subscribed"
        assert server.hub.subscriber_count == 2

        server.hub.publish(EventType.JOB_STARTED, {}, job_id="j2")
        server.hub.publish(EventType.JOB_STARTED, {}, job_id="j1")
        received = {(await receive_json(connection))["subscription"] for _ in range(2)}
        assert received == {"first", "second"}

    await wait_until(lambda: server.hub.subscriber_count == 0)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("not json", None),
        ("[1, 2]", "op"),
        ('{"op": "dance"}', "op"),
        ('{"op": "subscribe"}', "id"),
        ('{"op": "subscribe", "id": true}', "id"),
        ('{"op": "subscribe", "id": "x", "filter": {"types": ["job.bogus"]}}', "types"),
        ('{"op": "subscribe", "id": "x", "filter": {"colour": "red"}}', "filter"),
        ('{"op": "subscribe", "id": "x", "filter": {"job": 5}}', "filter.job"),
        ('{"op": "subscribe", "id": "x", "since": -1}', "since"),
        ('{"op": "subscribe", "id": "x", "since": "3"}', "since"),
        ('{"op": "unsubscribe", "id": "never"}', "id"),
    ],
)
async def test_ws_bad_message_gets_error(server, message, field):
    async with websockets.connect(server.ws_url) as connection:
        await connection.send(message)
        error = await receive_json(connection)
        await connection.send(json.dumps({"op": "ping"}))
        pong = await receive_json(connection)

    assert error["op"] == "error"
    assert error["message"]
    assert error["field"] == field
    assert pong == {"op": "pong"}
    assert server.hub.subscriber_count == 0


async def test_ws_duplicate_subscription_id_is_rejected(server):
    async with websockets.connect(server.ws_url) as connection:
        await connection.send(json.dumps({"op": "subscribe", "id": "a"}))
        assert (await receive_json(connection))["op"] == "subscribed"
        await connection.send(json.dumps({"op": "subscribe", "id": "a"}))
        error = await receive_json(connection)

    assert error == {
        "op": "error",
        "message": error["message"],
        "field": "id",
        "id": "a",
    }
    assert "already active" in error["message"]


async def test_ws_binary_message_gets_error(server):
    async with websockets.connect(server.ws_url) as connection:
        await connection.send(b"\x00\x01")
        error = await receive_json(connection)

    assert error["op"] == "error"
    assert "binary" in error["message"]


async def test_shutdown_ends_open_sse_and_ws_streams_promptly(server):
    async with asyncio.timeout(TEST_TIMEOUT_S), http_client(server) as client:
        async with aconnect_sse(client, "GET", "/events") as source:
            async with websockets.connect(server.ws_url) as connection:
                await connection.send(json.dumps({"op": "subscribe", "id": "w"}))
                assert (await receive_json(connection))["op"] == "subscribed"
                idle = await websockets.connect(server.ws_url)  # a socket with no subscription
                await wait_until(lambda: server.hub.subscriber_count == 2)

                started = time.monotonic()
                server.stop.set()
                sse_envelopes = [json.loads(message.data) async for message in source.aiter_sse()]
                ws_message = await receive_json(connection)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(connection.recv(), 2.0)
                with pytest.raises(websockets.ConnectionClosed) as idle_closed:
                    await asyncio.wait_for(idle.recv(), 2.0)
                await asyncio.wait_for(server.task, 5.0)
                shutdown_s = time.monotonic() - started

    assert [envelope["type"] for envelope in sse_envelopes] == ["server.shutdown"]
    assert ws_message["op"] == "event"
    assert ws_message["event"]["type"] == "server.shutdown"
    assert closed.value.rcvd.code == 1001
    assert idle_closed.value.rcvd.code == 1001
    assert shutdown_s < 3.0  # well under the 30 s graceful timeout
