"""The job API against real servers: states, cancel, deadlines, backpressure, session expiry, /metrics.

Long jobs are forward_backward calls on the tiny model with TRAINPULSE_MICRO_BATCH_TOKENS=32 and
one 24-token datum per micro-batch, so a job of N datums reports progress N times and can stop
between any two micro-batches.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from tinker import types

from conftest import API_KEY, TINY, start_server

SMALL_MICRO_BATCHES = {"TRAINPULSE_MICRO_BATCH_TOKENS": "32"}
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
DATUM_TOKENS = 24
BIG = 600  # micro-batches of a job that must still be running when the test acts on it (about 15 s on a quiet 2-core machine)


def _datum(offset: int = 0, length: int = DATUM_TOKENS) -> dict:
    tokens = [1 + (offset + i) % 500 for i in range(length + 1)]
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                               "weights": {"data": [1.0] * length, "dtype": "float32"}}}


def _batch(size: int) -> list[dict]:
    return [_datum(offset=7 * index) for index in range(size)]


class Api:
    """Raw HTTP calls, so tests control seq_ids, bodies and heartbeats exactly."""

    def __init__(self, server) -> None:
        self.http = httpx.Client(base_url=server.base_url, timeout=60.0)

    def session(self) -> str:
        return self.http.post("/api/v1/create_session", json={"tags": ["jobs-api"], "sdk_version": "test"}
                              ).json()["session_id"]

    def model(self, session_id: str) -> str:
        answer = self.http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": TINY,
                                                               "lora_config": {"rank": 4, "seed": 1}}).json()
        assert self.result(answer["request_id"])["model_id"] == answer["model_id"]
        return answer["model_id"]

    def forward_backward(self, model_id: str, size: int, seq_id: int | None = None, **extra) -> httpx.Response:
        body = {"model_id": model_id, "seq_id": seq_id,
                "forward_backward_input": {"loss_fn": "cross_entropy", "data": _batch(size)}, **extra}
        return self.http.post("/api/v1/forward_backward", json=body)

    def submit(self, model_id: str, size: int, seq_id: int | None = None, **extra) -> str:
        response = self.forward_backward(model_id, size, seq_id, **extra)
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def forward_logprobs(self, model_id: str, seq_id: int | None = None) -> list[list[float]]:
        body = {"model_id": model_id, "seq_id": seq_id,
                "forward_input": {"loss_fn": "cross_entropy", "data": _batch(2)}}
        answer = self.result(self.http.post("/api/v1/forward", json=body).json()["request_id"])
        return [output["logprobs"]["data"] for output in answer["loss_fn_outputs"]]

    def optim_step(self, model_id: str, seq_id: int | None = None, learning_rate: float = 0.05) -> dict:
        body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": learning_rate}}
        return self.result(self.http.post("/api/v1/optim_step", json=body).json()["request_id"])

    def retrieve(self, request_id: str) -> httpx.Response:
        return self.http.post("/api/v1/retrieve_future", json={"request_id": request_id})

    def result(self, request_id: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = self.retrieve(request_id)
            if response.status_code == 200:
                return response.json()
            assert response.status_code == 408, response.text
        raise AssertionError(f"request {request_id} did not finish in {timeout_s} s")

    def job(self, job_id: str) -> dict:
        response = self.http.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def jobs(self, **params) -> dict:
        response = self.http.get("/api/v1/jobs", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for(self, job_id: str, predicate, timeout_s: float = 60.0, what: str = "") -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if predicate(record):
                return record
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {what or predicate}: {self.job(job_id)}")

    def wait_end(self, job_id: str, timeout_s: float = 60.0) -> dict:
        return self.wait_for(job_id, lambda record: record["state"] in TERMINAL, timeout_s, "a terminal state")

    def wait_progress(self, job_id: str, timeout_s: float = 60.0) -> dict:
        return self.wait_for(job_id, lambda record: record["state"] == "running" and
                             record["progress"]["completed"] >= 1, timeout_s, "running with progress")

    def cancel(self, job_id: str) -> dict:
        response = self.http.post(f"/api/v1/jobs/{job_id}/cancel")
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict:
        response = self.http.get("/metrics")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return {family.name: family for family in text_string_to_metric_families(response.text)}


def _sample_value(families: dict, family: str, sample: str, **labels) -> float:
    return sum(s.value for s in families[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory, model_cache):
    running = start_server(tmp_path_factory.mktemp("jobs-api"), model_cache, env=SMALL_MICRO_BATCHES)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(jobs_server):
    client = Api(jobs_server)
    yield client
    client.http.close()


@pytest.fixture
def model_id(api) -> str:
    """A fresh model of its own: seq_ids start at 1 and no gradient is pending."""
    return api.model(api.session())


# ---- states ----------------------------------------------------------------------------------


def test_job_goes_queued_running_succeeded(api, model_id):
    first = api.submit(model_id, 6, seq_id=1)
    second = api.submit(model_id, 2, seq_id=2)

    running = api.wait_progress(first)
    queued = api.job(second)
    assert queued["state"] == "queued"
    assert queued["queue_position"] == 0
    assert queued["started_at"] is None
    listed = api.jobs(model=model_id, state="queued")
    assert [job["id"] for job in listed["jobs"]] == [second]
    assert running["phase"] in ("forward", "backward")
    assert running["progress"]["total"] == 6
    assert 0 < running["progress"]["fraction"] < 1
    assert running["progress"]["eta_s"] is not None

    for job_id in (first, second):
        done = api.wait_end(job_id)
        assert done["state"] == "succeeded"
        assert done["phase"] == "done"
        assert done["error"] is None
        assert done["progress"]["completed"] == done["progress"]["total"]
        assert done["progress"]["fraction"] == 1.0
        assert done["progress"]["eta_s"] == 0.0
        assert done["created_at"] <= done["started_at"] <= done["updated_at"] <= done["finished_at"]
        assert "tokens_per_s" in done["metrics"]
    assert api.job(first)["finished_at"] <= api.job(second)["started_at"]
    succeeded = {job["id"] for job in api.jobs(model=model_id, state="succeeded", kind="forward_backward")["jobs"]}
    assert succeeded == {first, second}


def test_failed_job_reports_message_and_category(api, model_id):
    bad = _datum()
    bad["model_input"]["chunks"][0]["tokens"][0] = 10_000_000
    body = {"model_id": model_id, "seq_id": 1, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [bad]}}
    job_id = api.http.post("/api/v1/forward_backward", json=body).json()["request_id"]

    done = api.wait_end(job_id)
    assert done["state"] == "failed"
    assert done["error"]["category"] == "user"
    assert "outside the vocabulary" in done["error"]["message"]
    assert done["started_at"] <= done["finished_at"]
    assert job_id in {job["id"] for job in api.jobs(state="failed")["jobs"]}
    answer = api.retrieve(job_id).json()
    assert answer["category"] == "user"
    assert "outside the vocabulary" in answer["error"]


def test_unknown_job_is_404(api):
    assert api.http.get("/api/v1/jobs/does-not-exist").status_code == 404
    assert api.http.post("/api/v1/cancel_future", json={"request_id": "does-not-exist"}).status_code == 404


def test_job_list_rejects_unknown_state(api):
    response = api.http.get("/api/v1/jobs", params={"state": "sleeping"})
    assert response.status_code == 400
    assert response.json()["field"] == "state"


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_queued_job_ends_at_once_and_later_seq_ids_run(api, model_id):
    long_job = api.submit(model_id, BIG, seq_id=1)
    queued = [api.submit(model_id, 1, seq_id=seq) for seq in (2, 3, 4)]
    api.wait_progress(long_job)

    cancelled = api.cancel(queued[1])
    assert cancelled["state"] == "cancelled"
    assert cancelled["cancel_requested"] is True
    assert cancelled["started_at"] is None
    assert cancelled["error"]["category"] == "user"
    assert api.job(queued[0])["state"] == "queued"
    assert api.job(queued[2])["state"] == "queued"

    api.cancel(long_job)
    assert api.wait_end(queued[0])["state"] == "succeeded"
    assert api.wait_end(queued[2])["state"] == "succeeded"
    assert api.job(queued[1])["state"] == "cancelled"


def test_cancel_running_job_leaves_model_unchanged(api, model_id):
    before = api.forward_logprobs(model_id)
    job_id = api.submit(model_id, BIG)
    api.wait_progress(job_id)

    requested = api.cancel(job_id)
    assert requested["cancel_requested"] is True
    done = api.wait_end(job_id, timeout_s=30.0)
    assert done["state"] == "cancelled"
    assert 1 <= done["progress"]["completed"] < BIG
    assert "cancelled" in done["error"]["message"]

    assert api.forward_logprobs(model_id) == before
    # No gradient of the cancelled job was kept, so a step with a high learning rate changes nothing.
    api.optim_step(model_id, learning_rate=0.5)
    assert api.forward_logprobs(model_id) == before


def test_cancel_is_idempotent_through_both_routes(api, model_id):
    job_id = api.submit(model_id, BIG)
    api.wait_progress(job_id)
    first = api.http.post("/api/v1/cancel_future", json={"request_id": job_id})
    assert first.status_code == 200
    assert first.json()["cancel_requested"] is True
    api.cancel(job_id)
    done = api.wait_end(job_id)
    assert done["state"] == "cancelled"
    again = api.http.post("/api/v1/cancel_future", json={"request_id": job_id}).json()
    assert again["state"] == "cancelled"
    assert again["finished_at"] == done["finished_at"]

    finished = api.submit(model_id, 1)
    api.wait_end(finished)
    assert api.cancel(finished)["state"] == "succeeded"


def test_retrieve_future_of_cancelled_job_is_user_error(api, model_id):
    job_id = api.submit(model_id, BIG)
    api.wait_progress(job_id)
    api.cancel(job_id)
    api.wait_end(job_id)
    response = api.retrieve(job_id)
    assert response.status_code == 200
    answer = response.json()
    assert answer["category"] == "user"
    assert "cancelled" in answer["error"]


def test_sdk_raises_request_failed_naming_cancel(jobs_server, api):
    client = tinker.ServiceClient(base_url=jobs_server.base_url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=4)
    batch = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, DATUM_TOKENS + 1))),
                         loss_fn_inputs={"target_tokens": list(range(2, DATUM_TOKENS + 2)),
                                         "weights": [1.0] * DATUM_TOKENS}) for _ in range(BIG)]
    future = training.forward_backward(batch, "cross_entropy")
    deadline = time.monotonic() + 30.0
    while not (running := api.jobs(model=training.model_id, state="running")["jobs"]):
        assert time.monotonic() < deadline, "the SDK's forward_backward never started"
        time.sleep(0.05)
    api.cancel(running[0]["id"])
    with pytest.raises(tinker.RequestFailedError) as failure:
        future.result(timeout=60)
    assert "cancelled" in str(failure.value)
    assert failure.value.category == types.RequestErrorCategory.User


# ---- deadlines -------------------------------------------------------------------------------


def test_timeout_s_in_body_ends_job_timed_out(api, model_id):
    started = time.monotonic()
    job_id = api.submit(model_id, BIG, timeout_s=1.5)
    done = api.wait_end(job_id, timeout_s=30.0)
    assert done["state"] == "timed_out"
    assert time.monotonic() - started < 15.0
    assert done["progress"]["completed"] < BIG
    assert done["expires_at"] == pytest.approx(done["created_at"] + 1.5)
    assert "timed out" in done["error"]["message"]
    answer = api.retrieve(job_id).json()
    assert answer["category"] == "user"
    assert "timed out" in answer["error"]
    invalid = api.forward_backward(model_id, 1, timeout_s=0)
    assert invalid.status_code == 400
    assert invalid.json()["field"] == "timeout_s"


def test_server_default_deadline_times_out_jobs(fresh_server):
    server = fresh_server(env={**SMALL_MICRO_BATCHES, "TRAINPULSE_JOB_TIMEOUT_S": "3"})
    api = Api(server)
    model_id = api.model(api.session())
    job_id = api.submit(model_id, BIG, seq_id=1)
    # seq_id 3 waits for the missing seq_id 2 (the gap timeout is 30 s), so it is still queued when
    # its own deadline passes, however fast the first job ends.
    behind = api.submit(model_id, 1, seq_id=3)
    done = api.wait_end(job_id, timeout_s=30.0)
    assert done["state"] == "timed_out"
    assert "3.0 s deadline" in done["error"]["message"]
    # A queued job gets the same default deadline, counted from its submission.
    queued_out = api.wait_end(behind, timeout_s=10.0)
    assert queued_out["state"] == "timed_out"
    assert queued_out["started_at"] is None

    client = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=4)
    batch = [types.Datum(model_input=types.ModelInput.from_ints(list(range(1, DATUM_TOKENS + 1))),
                         loss_fn_inputs={"target_tokens": list(range(2, DATUM_TOKENS + 2))}) for _ in range(BIG)]
    with pytest.raises(tinker.RequestFailedError) as failure:
        training.forward_backward(batch, "cross_entropy").result(timeout=60)
    assert "timed out" in str(failure.value)
    assert failure.value.category == types.RequestErrorCategory.User


# ---- ordering and futures --------------------------------------------------------------------


def test_out_of_order_seq_ids_run_in_order(api, model_id):
    ids = {seq: api.submit(model_id, 1, seq_id=seq) for seq in (3, 2, 1)}
    records = {seq: api.wait_end(job_id) for seq, job_id in ids.items()}
    assert all(record["state"] == "succeeded" for record in records.values())
    assert records[1]["finished_at"] <= records[2]["started_at"]
    assert records[2]["finished_at"] <= records[3]["started_at"]


def test_retried_seq_id_runs_once(api, model_id):
    first = api.forward_backward(model_id, 1, seq_id=1).json()["request_id"]
    retry = api.forward_backward(model_id, 1, seq_id=1).json()["request_id"]
    assert retry == first
    api.wait_end(first)
    assert [job["id"] for job in api.jobs(model=model_id, kind="forward_backward")["jobs"]] == [first]


def test_rejected_seq_id_does_not_block_later_ones(api, model_id):
    missing = {"model_id": model_id, "seq_id": 1, "path": f"tinker://{model_id}/weights/never-saved"}
    rejected = api.http.post("/api/v1/load_weights", json=missing)
    assert 400 <= rejected.status_code < 500
    job_id = api.submit(model_id, 1, seq_id=2)
    # The lane's gap timeout is 30 s; the job must run long before it.
    assert api.wait_end(job_id, timeout_s=10.0)["state"] == "succeeded"


def test_invalid_body_seq_id_does_not_block_later_ones(api, model_id):
    invalid = {"model_id": model_id, "seq_id": 1, "forward_backward_input": {"loss_fn": "cross_entropy",
                                                                            "data": "not a list"}}
    assert api.http.post("/api/v1/forward_backward", json=invalid).status_code == 400
    job_id = api.submit(model_id, 1, seq_id=2)
    try:
        assert api.wait_end(job_id, timeout_s=5.0)["state"] == "succeeded"
    finally:
        api.cancel(job_id)


def test_retrieve_future_returns_at_job_end(api, model_id):
    job_id = api.submit(model_id, 40)  # about 1 s of work on a quiet machine
    api.wait_for(job_id, lambda record: record["state"] == "running", what="running")
    asked = time.time()
    response = api.retrieve(job_id)
    answered = time.time()
    assert response.status_code == 200, response.text
    assert "loss_fn_outputs" in response.json()
    finished_at = api.job(job_id)["finished_at"]
    assert answered >= finished_at
    assert answered - finished_at < 1.0
    assert finished_at - asked > 0.2  # the request was held while the job ran


# ---- /metrics --------------------------------------------------------------------------------


def test_metrics_parse_and_count_jobs(api, model_id):
    api.wait_end(api.submit(model_id, 2, seq_id=1))
    before = api.metrics()
    ended_before = _sample_value(before, "trainpulse_job_duration_seconds", "trainpulse_job_duration_seconds_count",
                                 kind="forward_backward", state="succeeded")
    listed = api.jobs(kind="forward_backward", state="succeeded")["total"]
    assert ended_before == listed
    steps_before = _sample_value(before, "trainpulse_training_steps", "trainpulse_training_steps_total")

    api.wait_end(api.submit(model_id, 2, seq_id=2))
    api.optim_step(model_id, seq_id=3)
    after = api.metrics()
    assert _sample_value(after, "trainpulse_job_duration_seconds", "trainpulse_job_duration_seconds_count",
                         kind="forward_backward", state="succeeded") == ended_before + 1
    assert _sample_value(after, "trainpulse_jobs_ended", "trainpulse_jobs_ended_total",
                         kind="optim_step", state="succeeded") >= 1
    assert _sample_value(after, "trainpulse_training_steps", "trainpulse_training_steps_total") == steps_before + 1
    assert _sample_value(after, "trainpulse_tokens_trained", "trainpulse_tokens_trained_total") > 0
    counts = {sample.labels["state"]: sample.value for sample in after["trainpulse_jobs"].samples}
    assert set(counts) == TERMINAL | {"queued", "running"}
    assert counts["succeeded"] == api.jobs(state="succeeded")["total"]
    assert _sample_value(after, "trainpulse_event_subscribers", "trainpulse_event_subscribers") == 0
    assert _sample_value(after, "trainpulse_queue_depth", "trainpulse_queue_depth", model_id=model_id) == 0


def test_metrics_show_queue_depth(api, model_id):
    long_job = api.submit(model_id, BIG, seq_id=1)
    queued = [api.submit(model_id, 1, seq_id=seq) for seq in (2, 3)]
    api.wait_progress(long_job)
    families = api.metrics()
    assert _sample_value(families, "trainpulse_queue_depth", "trainpulse_queue_depth", model_id=model_id) == 2
    assert _sample_value(families, "trainpulse_jobs", "trainpulse_jobs", state="running") >= 1
    for job_id in (*queued, long_job):
        api.cancel(job_id)


# ---- backpressure and session expiry ---------------------------------------------------------


def _log_count(server, text: str) -> int:
    return server.log().count(text)


def test_queue_limits_return_429_and_sdk_backs_off(fresh_server):
    server = fresh_server(env={**SMALL_MICRO_BATCHES, "TRAINPULSE_MAX_QUEUED_PER_MODEL": "2",
                               "TRAINPULSE_MAX_QUEUED_TOTAL": "3"})
    api = Api(server)
    client = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    training = client.create_lora_training_client(base_model=TINY, rank=4)
    session_id = api.session()
    first, second = api.model(session_id), api.model(session_id)

    blockers = [api.submit(first, BIG, seq_id=1), api.submit(second, BIG, seq_id=1)]
    queued = [api.submit(first, 1, seq_id=2), api.submit(first, 1, seq_id=3)]
    per_model = api.forward_backward(first, 1, seq_id=4)
    assert per_model.status_code == 429
    assert int(per_model.headers["Retry-After"]) >= 1
    assert f"model {first}" in per_model.json()["error"]

    queued.append(api.submit(second, 1, seq_id=2))
    total = api.forward_backward(second, 1, seq_id=3)
    assert total.status_code == 429
    assert "server" in total.json()["error"]
    assert int(total.headers["Retry-After"]) >= 1

    rejected_before = _log_count(server, "POST /api/v1/forward_backward -> 429")
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: training.forward_backward([datum], "cross_entropy").result(timeout=90))
        deadline = time.monotonic() + 20.0
        while _log_count(server, "POST /api/v1/forward_backward -> 429") == rejected_before:
            assert time.monotonic() < deadline, "the SDK request was never rejected with 429"
            time.sleep(0.1)
        for job_id in (*queued, *blockers):
            api.cancel(job_id)
        assert pending.result(timeout=120).metrics["loss:sum"] > 0


def test_session_without_heartbeat_loses_queued_work(fresh_server):
    server = fresh_server(env={**SMALL_MICRO_BATCHES, "TRAINPULSE_SESSION_TIMEOUT_S": "2"})
    api = Api(server)
    live_session, silent_session = api.session(), api.session()
    silent_model = api.model(silent_session)
    running = api.submit(silent_model, BIG, seq_id=1)
    queued = [api.submit(silent_model, 1, seq_id=seq) for seq in (2, 3)]
    api.wait_progress(running)

    deadline = time.monotonic() + 15.0
    while api.job(queued[-1])["state"] == "queued":
        assert api.http.post("/api/v1/session_heartbeat", json={"session_id": live_session}).status_code == 200
        assert time.monotonic() < deadline, "the silent session's queued work was never cancelled"
        time.sleep(0.3)
    for job_id in queued:
        record = api.job(job_id)
        assert record["state"] == "cancelled"
        assert "heartbeat" in record["error"]["message"]
        assert record["started_at"] is None
    assert api.job(running)["state"] == "running"  # only queued work goes
    api.cancel(running)

    # The session that kept its heartbeats still trains.
    live_model = api.model(live_session)
    assert api.wait_end(api.submit(live_model, 1, seq_id=1))["state"] == "succeeded"
