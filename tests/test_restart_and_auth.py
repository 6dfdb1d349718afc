"""A graceful restart under an SDK client, and API-key checks on every transport."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import tinker
import websockets
from tinker import types

from conftest import API_KEY, TINY, make_client, start_server

BIG = 600  # micro-batches of a job that is still running when the server is stopped


def _datum(length: int = 24) -> types.Datum:
    tokens = list(range(1, length + 1))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens),
                       loss_fn_inputs={"target_tokens": [token + 1 for token in tokens],
                                       "weights": [1.0] * length})


def _wait_running(http: httpx.Client, model_id: str) -> dict:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        running = http.get("/api/v1/jobs", params={"model": model_id, "state": "running"}).json()["jobs"]
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no job started running")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, model_cache):
    """Train, save, stop the server with SIGTERM while a job runs, start it again on the same storage."""
    storage = tmp_path_factory.mktemp("restart-storage")
    first = start_server(storage, model_cache, env={"TRAINPULSE_MICRO_BATCH_TOKENS": "32"})
    try:
        client = make_client(first)
        training = client.create_lora_training_client(base_model=TINY, rank=4, seed=1)
        training.forward_backward([_datum()], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        state_path = training.save_state("before-restart").result().path
        finished = [job["id"] for job in httpx.get(first.url("/api/v1/jobs")).json()["jobs"]]
        training.forward_backward([_datum() for _ in range(BIG)], "cross_entropy")
        with httpx.Client(base_url=first.base_url, timeout=30.0) as http:
            interrupted = _wait_running(http, training.model_id)
        stop_code = first.stop()
    finally:
        if first.process.poll() is None:
            first.kill()
    # The same port, so the SDK client of the first run talks to the second.
    second = start_server(storage, model_cache, port=first.port)
    yield {"server": second, "training": training, "state_path": state_path, "finished": finished,
           "interrupted": interrupted["id"], "stop_code": stop_code}
    second.stop()


def test_sigterm_fails_running_job_as_server_error(restarted):
    assert restarted["stop_code"] == 0
    record = httpx.get(restarted["server"].url(f"/api/v1/jobs/{restarted['interrupted']}")).json()
    assert record["state"] == "failed"
    assert record["error"]["category"] == "server"
    assert "shut down" in record["error"]["message"]
    assert record["phase"] != "queued"


def test_job_list_includes_earlier_run(restarted):
    listed = {job["id"] for job in httpx.get(restarted["server"].url("/api/v1/jobs"),
                                             params={"limit": 500}).json()["jobs"]}
    assert set(restarted["finished"]) <= listed
    assert restarted["interrupted"] in listed


def test_stale_sdk_client_raises_instead_of_hanging(restarted):
    started = time.monotonic()
    with pytest.raises(tinker.APIStatusError) as failure:
        restarted["training"].forward_backward([_datum()], "cross_entropy").result(timeout=60)
    assert failure.value.status_code == 410
    assert "load_weights" in str(failure.value)
    assert time.monotonic() - started < 60  # hang guard: the SDK must not keep retrying


def test_training_client_from_saved_state_resumes(restarted):
    client = make_client(restarted["server"])
    info = client.create_rest_client().get_weights_info_by_tinker_path(restarted["state_path"]).result()
    assert info.base_model == TINY
    assert info.lora_rank == 4
    resumed = client.create_training_client_from_state(restarted["state_path"])
    assert resumed.forward_backward([_datum()], "cross_entropy").result().metrics["loss:sum"] > 0


def test_api_key_required_on_every_transport(fresh_server):
    server = fresh_server(env={"TRAINPULSE_API_KEY": API_KEY})
    assert httpx.get(server.url("/api/v1/healthz")).status_code == 200
    missing = httpx.get(server.url("/api/v1/jobs"))
    assert missing.status_code == 401
    assert missing.json()["field"] == "X-API-Key"
    assert httpx.get(server.url("/api/v1/jobs"), headers={"X-API-Key": API_KEY}).status_code == 200
    with httpx.stream("GET", server.url("/api/v1/events")) as stream:
        assert stream.status_code == 401
    ws_url = server.base_url.replace("http://", "ws://") + "/api/v1/ws"

    async def handshake(url: str):
        async with websockets.connect(url, open_timeout=10) as socket:
            await socket.send('{"op": "ping"}')
            return await asyncio.wait_for(socket.recv(), 10)

    with pytest.raises(websockets.InvalidStatus) as rejected:
        asyncio.run(handshake(ws_url))
    assert rejected.value.response.status_code == 401
    assert "pong" in asyncio.run(handshake(f"{ws_url}?api_key={API_KEY}"))
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=server.base_url, api_key="tml-wrong-key").get_server_capabilities()
