"""Live job events end to end: a real server, the unmodified SDK driving training, and SSE and
WebSocket clients reading what the hub sends."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from tinker import types
from websockets.asyncio.client import connect as ws_connect

from conftest import TINY, RunningServer, make_client
from server.api.schemas import MAX_METADATA_BYTES

STREAM_LIMIT_S = 120.0  # upper bound for any one stream read, so a broken stream fails the test
JOB_PHASE_TYPES = {"job.phase", "job.progress", "job.metrics"}
TERMINAL = {"job.succeeded", "job.failed", "job.cancelled", "job.timed_out"}


@dataclass
class Trainer:
    """One LoRA model on a server and the tiny batch its steps train on."""

    server: RunningServer
    training: Any
    model_id: str
    batch: list[types.Datum]

    def start_step(self) -> tuple[Any, Any]:
        """Submit forward_backward and optim_step without waiting for either."""
        forward_backward = self.training.forward_backward(self.batch, "cross_entropy")
        optim = self.training.optim_step(types.AdamParams(learning_rate=1e-3))
        return forward_backward, optim

    def step(self) -> None:
        forward_backward, optim = self.start_step()
        forward_backward.result()
        optim.result()


def make_trainer(server: RunningServer, seed: int = 1) -> Trainer:
    training = make_client(server).create_lora_training_client(base_model=TINY, rank=4, seed=seed)
    ids = training.get_tokenizer().encode("Live events follow every training step.")
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    return Trainer(server, training, training.model_id, [datum])


@pytest.fixture(scope="module")
def trainer(server) -> Trainer:
    return make_trainer(server)


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))


async def read_sse(http: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None,
                   until: Callable[[list[dict]], bool] = lambda events: False,
                   connected: asyncio.Event | None = None) -> list[dict]:
    """Collect the envelopes of one SSE stream until it ends or `until(events)` is true."""
    events: list[dict] = []
    async with asyncio.timeout(STREAM_LIMIT_S):
        async with aconnect_sse(http, "GET", url, headers=dict(headers or {})) as source:
            source.response.raise_for_status()
            if connected is not None:
                connected.set()
            async for message in source.aiter_sse():
                event = json.loads(message.data)
                assert message.id == str(event["id"])
                event["received_at"] = time.time()
                events.append(event)
                if until(events):
                    break
    return events


async def read_ws_job(base_url: str, job_id: str) -> list[dict]:
    """Subscribe to one job over the WebSocket from the start of the buffer, up to its end."""
    events: list[dict] = []
    url = base_url.replace("http://", "ws://") + "/api/v1/ws"
    async with asyncio.timeout(STREAM_LIMIT_S), ws_connect(url) as socket_:
        await socket_.send(json.dumps({"op": "subscribe", "id": "job", "filter": {"job": job_id}, "since": 0}))
        ack = json.loads(await socket_.recv())
        assert ack["op"] == "subscribed"
        while not events or events[-1]["type"] not in TERMINAL:
            message = json.loads(await socket_.recv())
            assert message["op"] == "event"
            assert message["subscription"] == "job"
            events.append(message["event"])
    return events


async def wait_for_job(http: httpx.AsyncClient, server: RunningServer, model_id: str, kind: str,
                       known: set[str]) -> str:
    """Poll the job list until a job of `kind` that is not in `known` appears, and return its id."""
    async with asyncio.timeout(60):
        while True:
            page = (await http.get(server.url("/api/v1/jobs"), params={"model": model_id, "kind": kind})).json()
            fresh = [job["id"] for job in page["jobs"] if job["id"] not in known]
            if fresh:
                return fresh[0]
            await asyncio.sleep(0.02)


async def job_ids(http: httpx.AsyncClient, server: RunningServer, model_id: str) -> set[str]:
    page = (await http.get(server.url("/api/v1/jobs"), params={"model": model_id, "limit": 500})).json()
    return {job["id"] for job in page["jobs"]}


async def subscriber_count(http: httpx.AsyncClient, server: RunningServer) -> int:
    return (await http.get(server.url("/api/v1/status"))).json()["subscribers"]


async def wait_for_subscribers(http: httpx.AsyncClient, server: RunningServer, expected: int,
                               timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while await subscriber_count(http, server) != expected:
            await asyncio.sleep(0.05)


def succeeded_count(model_id: str, count: int) -> Callable[[list[dict]], bool]:
    def done(events: list[dict]) -> bool:
        return sum(e["type"] == "job.succeeded" and e["model_id"] == model_id for e in events) >= count
    return done


def assert_ids_increase(events: list[dict]) -> None:
    ids = [event["id"] for event in events]
    assert all(earlier < later for earlier, later in zip(ids, ids[1:])), ids


def assert_job_lifecycle(events: list[dict], job_id: str) -> None:
    types_ = [event["type"] for event in events]
    assert types_[0] == "job.queued", types_
    assert types_[1] == "job.started", types_
    assert types_[-1] == "job.succeeded", types_
    assert set(types_[2:-1]) == JOB_PHASE_TYPES, types_
    assert {event["job_id"] for event in events} == {job_id}
    assert_ids_increase(events)


# ---- one job's stream -------------------------------------------------------------------------

async def test_job_stream_sse_and_ws_deliver_lifecycle(trainer):
    server = trainer.server
    async with new_client() as http:
        known = await job_ids(http, server, trainer.model_id)
        futures = trainer.start_step()
        job_id = await wait_for_job(http, server, trainer.model_id, "forward_backward", known)

        sse, ws = await asyncio.gather(read_sse(http, server.url(f"/api/v1/jobs/{job_id}/events")),
                                       read_ws_job(server.base_url, job_id))
        await asyncio.gather(*(asyncio.to_thread(future.result) for future in futures))

        # The stream ended by itself after the terminal event, and both transports agree.
        assert_job_lifecycle(sse, job_id)
        assert [event["id"] for event in ws] == [event["id"] for event in sse]
        assert sse[-1]["data"]["state"] == "succeeded"

        replayed = await read_sse(http, server.url(f"/api/v1/jobs/{job_id}/events"))
        assert [event["id"] for event in replayed] == [event["id"] for event in sse]


async def test_job_stream_reconnect_after_end_is_204(trainer):
    server = trainer.server
    async with new_client() as http:
        known = await job_ids(http, server, trainer.model_id)
        await asyncio.to_thread(trainer.step)
        job_id = await wait_for_job(http, server, trainer.model_id, "optim_step", known)
        events = await read_sse(http, server.url(f"/api/v1/jobs/{job_id}/events"))
        response = await http.get(server.url(f"/api/v1/jobs/{job_id}/events"),
                                  headers={"Last-Event-ID": str(events[-1]["id"])})
        assert response.status_code == 204


# ---- the multiplexed stream --------------------------------------------------------------------

FILTER_CASES: list[tuple[str, Callable[[dict, dict], bool]]] = [
    ("model={model}", lambda event, ids: event["model_id"] == ids["model"]),
    ("job={job}", lambda event, ids: event["job_id"] == ids["job"]),
    ("types=job.*", lambda event, ids: event["type"].startswith("job.")),
    ("types=job.succeeded", lambda event, ids: event["type"] == "job.succeeded"),
    ("model={model}&types=job.succeeded",
     lambda event, ids: event["model_id"] == ids["model"] and event["type"] == "job.succeeded"),
]


async def test_event_filters_match_reference_stream(trainer):
    server = trainer.server
    async with new_client() as http:
        known = await job_ids(http, server, trainer.model_id)
        await asyncio.to_thread(trainer.step)
        job_id = await wait_for_job(http, server, trainer.model_id, "forward_backward", known)
        last_job = await wait_for_job(http, server, trainer.model_id, "optim_step", known)
        last_id = (await read_sse(http, server.url(f"/api/v1/jobs/{last_job}/events")))[-1]["id"]

        # The unfiltered replay from the start of the buffer is the reference for every filter.
        reference = await read_sse(http, server.url("/api/v1/events?last_event_id=0"),
                                   until=lambda events: events[-1]["id"] >= last_id)
        assert [event["id"] for event in reference] == list(range(1, last_id + 1))
        assert any(not event["type"].startswith("job.") for event in reference), "no model.created"

        ids = {"model": trainer.model_id, "job": job_id}
        for query, matches in FILTER_CASES:
            expected = [event["id"] for event in reference if matches(event, ids)]
            assert expected, query
            got = await read_sse(http, server.url(f"/api/v1/events?last_event_id=0&{query.format(**ids)}"),
                                 until=lambda events, count=len(expected): len(events) >= count)
            assert [event["id"] for event in got] == expected, query


async def test_unknown_event_type_filter_is_400(server):
    async with new_client() as http:
        response = await http.get(server.url("/api/v1/events?types=job.exploded"))
        assert response.status_code == 400
        assert response.json()["field"] == "types"


async def test_resume_with_last_event_id_loses_nothing(trainer):
    server = trainer.server
    url = server.url(f"/api/v1/events?model={trainer.model_id}")
    done = succeeded_count(trainer.model_id, 4)  # two steps of forward_backward and optim_step
    async with new_client() as http:
        reference_ready, first_ready = asyncio.Event(), asyncio.Event()
        reference_task = asyncio.create_task(read_sse(http, url, until=done, connected=reference_ready))
        first_task = asyncio.create_task(read_sse(http, url, until=lambda events: len(events) >= 4,
                                                  connected=first_ready))
        await reference_ready.wait()
        await first_ready.wait()

        steps = asyncio.create_task(asyncio.to_thread(lambda: (trainer.step(), trainer.step())))
        first = await first_task
        # The reconnect waits until events have gone out while this client was away.
        await read_sse(http, server.url(f"/api/v1/events?model={trainer.model_id}&last_event_id={first[-1]['id']}"),
                       until=lambda events: len(events) >= 3)
        seen = list(first)
        resumed = await read_sse(http, url, headers={"Last-Event-ID": str(first[-1]["id"])},
                                 until=lambda events: done(seen + events))
        reference = await reference_task
        await steps

    combined = [event["id"] for event in first + resumed]
    assert combined == [event["id"] for event in reference]
    assert len(set(combined)) == len(combined)


EARLIER_RUN_ID = 10**9  # an event id that this server run has not reached, as if left by an earlier run


async def test_resume_with_id_of_earlier_run_starts_with_resync(trainer):
    server = trainer.server
    url = server.url(f"/api/v1/events?model={trainer.model_id}")
    async with new_client() as http:
        connected = asyncio.Event()
        reading = asyncio.create_task(read_sse(http, url, headers={"Last-Event-ID": str(EARLIER_RUN_ID)},
                                               until=succeeded_count(trainer.model_id, 2), connected=connected))
        await connected.wait()
        await asyncio.to_thread(trainer.step)
        events = await reading

    resync, live = events[0], events[1:]
    assert resync["type"] == "resync"
    assert "earlier server run" in resync["data"]["reason"]
    assert resync["id"] < EARLIER_RUN_ID
    # The stream continues live after the resync, with the events of the step taken meanwhile.
    assert [event["type"] for event in live if event["type"] == "job.succeeded"] == ["job.succeeded"] * 2
    assert {event["model_id"] for event in live} == {trainer.model_id}
    assert live[0]["id"] > resync["id"]
    assert_ids_increase(live)


async def test_ws_since_of_earlier_run_gets_resync_then_live(trainer):
    url = trainer.server.base_url.replace("http://", "ws://") + "/api/v1/ws"
    async with asyncio.timeout(STREAM_LIMIT_S), ws_connect(url) as socket_:
        await socket_.send(json.dumps({"op": "subscribe", "id": "old", "filter": {"model": trainer.model_id},
                                       "since": EARLIER_RUN_ID}))
        ack = json.loads(await socket_.recv())
        step = asyncio.create_task(asyncio.to_thread(trainer.step))
        events = []
        while not succeeded_count(trainer.model_id, 2)(events):
            message = json.loads(await socket_.recv())
            assert message["op"] == "event", message
            events.append(message["event"])
        await step

    assert ack["op"] == "subscribed"
    assert events[0]["type"] == "resync"
    assert events[0]["id"] == ack["last_event_id"]
    assert "earlier server run" in events[0]["data"]["reason"]
    assert {event["model_id"] for event in events[1:]} == {trainer.model_id}
    assert events[1]["id"] > events[0]["id"]


# ---- retrieve_future -------------------------------------------------------------------------

async def test_retrieve_future_wakes_on_job_end(trainer):
    server = trainer.server
    delays_s = []
    async with new_client() as http:
        for _ in range(3):
            known = await job_ids(http, server, trainer.model_id)
            futures = [*trainer.start_step(), *trainer.start_step()]
            # The second forward_backward waits behind two jobs, so the long-poll starts early.
            first = await wait_for_job(http, server, trainer.model_id, "forward_backward", known)
            job_id = await wait_for_job(http, server, trainer.model_id, "forward_backward", known | {first})
            events_task = asyncio.create_task(read_sse(http, server.url(f"/api/v1/jobs/{job_id}/events")))

            state = (await http.get(server.url(f"/api/v1/jobs/{job_id}"))).json()["state"]
            response = await http.post(server.url("/api/v1/retrieve_future"), json={"request_id": job_id})
            answered_at = time.time()
            events = await events_task
            await asyncio.gather(*(asyncio.to_thread(future.result) for future in futures))

            assert state in ("queued", "running"), "the job ended before the long-poll started"
            assert response.status_code == 200
            assert events[-1]["type"] == "job.succeeded"
            delays_s.append(answered_at - events[-1]["time"])

    print(f"\nretrieve_future answer after job.succeeded: {', '.join(f'{d * 1000:.1f}' for d in delays_s)} ms")
    # A sleep loop polling every 0.5 s or more would miss this bound in most of three tries.
    assert statistics.median(delays_s) < 0.25, delays_s


# ---- a small ring buffer ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_ring(tmp_path_factory, model_cache):
    """A server that keeps only 4 events, after one training step has pushed older ones out."""
    from conftest import start_server

    running = start_server(tmp_path_factory.mktemp("small-ring"), model_cache,
                           env={"TRAINPULSE_EVENT_RING_SIZE": "4"})
    trainer = make_trainer(running)
    trainer.step()
    yield trainer
    running.stop()


async def test_resume_older_than_buffer_starts_with_resync(small_ring):
    server = small_ring.server
    async with new_client() as http:
        events = await read_sse(http, server.url("/api/v1/events"), headers={"Last-Event-ID": "1"},
                                until=lambda events: True)
    assert events[0]["type"] == "resync"
    assert events[0]["data"]["oldest_id"] > 2


async def test_ws_since_older_than_buffer_gets_resync(small_ring):
    url = small_ring.server.base_url.replace("http://", "ws://") + "/api/v1/ws"
    async with asyncio.timeout(30), ws_connect(url) as socket_:
        await socket_.send(json.dumps({"op": "subscribe", "id": 7, "since": 1}))
        assert json.loads(await socket_.recv())["op"] == "subscribed"
        message = json.loads(await socket_.recv())
    assert message["op"] == "event"
    assert message["event"]["type"] == "resync"


async def test_finished_job_stream_ends_after_buffer_moved_on(small_ring):
    server = small_ring.server
    async with new_client() as http:
        forward_backward = await wait_for_job(http, server, small_ring.model_id, "forward_backward", set())
        optim = await wait_for_job(http, server, small_ring.model_id, "optim_step", set())

        # Every event of the first job has left the ring, so a terminal event rebuilt from its record replaces them.
        evicted = await read_sse(http, server.url(f"/api/v1/jobs/{forward_backward}/events"))
        # The last job's final events are still buffered and come as they were published.
        buffered = await read_sse(http, server.url(f"/api/v1/jobs/{optim}/events"))

    assert [event["type"] for event in evicted] == ["job.succeeded"]
    assert evicted[0]["job_id"] == forward_backward
    assert evicted[0]["data"]["state"] == "succeeded"
    assert evicted[0]["data"]["id"] == forward_backward
    assert buffered[-1]["type"] == "job.succeeded"
    assert buffered[-1]["job_id"] == optim
    assert {event["job_id"] for event in buffered} == {optim}
    assert_ids_increase(buffered)


# ---- a stalled subscriber ---------------------------------------------------------------------

def open_stalled_stream(server: RunningServer) -> socket.socket:
    """Open /api/v1/events on a raw socket that never reads, with a small receive buffer."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # set before connect to cap the window
    raw.connect(("127.0.0.1", server.port))
    raw.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                "Accept: text/event-stream\r\n\r\n".encode())
    return raw


def create_bulky_model(client, marker: str) -> None:
    """Create a model whose model.created event carries about 63 KB of user metadata, near the limit.

    The server's kernel send buffer grows to a few MB on loopback, and only once it is full does
    the stalled stream stop taking events from its hub queue. Bulky events fill it sooner.
    """
    metadata = {"marker": marker, "padding": "x" * (MAX_METADATA_BYTES - 1024)}
    client.create_lora_training_client(base_model=TINY, rank=4, user_metadata=metadata)


async def test_stalled_subscriber_is_dropped_without_delaying_others(fresh_server):
    server = fresh_server(env={"TRAINPULSE_EVENT_QUEUE_SIZE": "16"})
    client = make_client(server)
    max_rounds = 300  # about 19 MB of events, several times a loopback send buffer
    async with new_client() as http:
        reader_ready = asyncio.Event()

        def reached_last(events: list[dict]) -> bool:
            metadata = events[-1]["data"].get("user_metadata") or {}
            return events[-1]["type"] == "model.created" and metadata.get("marker") == "last"

        reader = asyncio.create_task(read_sse(http, server.url("/api/v1/events"), connected=reader_ready,
                                              until=reached_last))
        await reader_ready.wait()
        stalled = await asyncio.to_thread(open_stalled_stream, server)
        try:
            await wait_for_subscribers(http, server, 2)
            rounds = 0
            while rounds < max_rounds and await subscriber_count(http, server) == 2:
                await asyncio.to_thread(create_bulky_model, client, f"round {rounds}")
                rounds += 1
            count_after = await subscriber_count(http, server)

            # One more model ends the reader, which must have kept up throughout.
            await asyncio.to_thread(create_bulky_model, client, "last")
            events = await reader
        finally:
            stalled.close()

    print(f"\nstalled subscriber dropped after {rounds} models with 63 KB events")
    assert count_after == 1, f"still subscribed after {rounds} models with 63 KB events"
    assert "dropped a lagging event subscriber" in server.log()
    created = [event for event in events if event["type"] == "model.created"]
    assert len(created) == rounds + 1
    assert not [event for event in events if event["type"] in ("stream.lagged", "resync")]
    assert [event["id"] for event in events] == list(range(events[0]["id"], events[-1]["id"] + 1))
    delays_s = sorted(event["received_at"] - event["time"] for event in events)
    print(f"other subscriber's delivery delay: p50 {delays_s[len(delays_s) // 2] * 1000:.1f} ms, "
          f"max {delays_s[-1] * 1000:.1f} ms over {len(events)} events")
    assert delays_s[-1] < 2.0


# ---- shutdown ---------------------------------------------------------------------------------

async def test_shutdown_with_open_streams_is_prompt(fresh_server):
    server = fresh_server()
    sse_count, ws_count = 100, 3
    ws_url = server.base_url.replace("http://", "ws://") + "/api/v1/ws"

    async def ws_until_close() -> list[dict]:
        received = []
        async with ws_connect(ws_url) as socket_:
            await socket_.send(json.dumps({"op": "subscribe", "id": "all"}))
            async for raw in socket_:
                received.append(json.loads(raw))
        return received

    async with new_client() as http:
        streams = [asyncio.create_task(read_sse(http, server.url("/api/v1/events"))) for _ in range(sse_count)]
        sockets = [asyncio.create_task(ws_until_close()) for _ in range(ws_count)]
        await wait_for_subscribers(http, server, sse_count + ws_count)

        started = time.monotonic()
        exit_code = await asyncio.to_thread(server.stop)
        exit_s = time.monotonic() - started
        sse_results = await asyncio.wait_for(asyncio.gather(*streams), 10)
        ws_results = await asyncio.wait_for(asyncio.gather(*sockets), 10)

    print(f"\nserver exit after SIGTERM with {sse_count} SSE and {ws_count} WebSocket streams: {exit_s:.2f} s")
    assert exit_code == 0
    assert exit_s < 15.0, "hang guard only"
    assert [events[-1]["type"] for events in sse_results] == ["server.shutdown"] * sse_count
    assert [messages[-1]["op"] for messages in ws_results] == ["event"] * ws_count
    assert [messages[-1]["event"]["type"] for messages in ws_results] == ["server.shutdown"] * ws_count
