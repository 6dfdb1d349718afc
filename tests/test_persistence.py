"""Jobs, results, model records and checkpoints outlive the server process.

The store tests drive SqliteJobStore directly on a temporary file. The scenario of the module
fixture runs once: train and save on a server, SIGKILL it while a long
sample job runs, start a new server on the same storage folder. The tests then check what the new
server serves. Retention runs on servers of its own with a 2 s retention.
"""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest
from tinker import types

from conftest import TINY, make_client, start_server
from server.jobs.record import Job
from server.jobs.states import RESTART_MESSAGE, JobState
from server.jobs.store import SqliteJobStore
from server.services.checkpoints import METADATA_FILE, CheckpointService
from server.services.models import repair_checkpoint_folders

RETENTION_S = 2.0
LONG_SAMPLE = {"num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
               "sampling_params": {"max_tokens": 3000, "temperature": 1.0, "seed": 1}, "base_model": TINY}
SHORT_SAMPLE = {**LONG_SAMPLE, "sampling_params": {"max_tokens": 2, "temperature": 1.0, "seed": 1}}


def _datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


def _job(server, job_id: str) -> httpx.Response:
    return httpx.get(server.url(f"/api/v1/jobs/{job_id}"), timeout=10.0)


def _retrieve(server, job_id: str) -> httpx.Response:
    return httpx.post(server.url("/api/v1/retrieve_future"), json={"request_id": job_id}, timeout=60.0)


def _only_job_id(server, kind: str) -> str:
    jobs = httpx.get(server.url("/api/v1/jobs"), params={"kind": kind}, timeout=10.0).json()["jobs"]
    assert len(jobs) == 1, jobs
    return jobs[0]["id"]


def _wait_for_state(server, job_id: str, states: set[str], timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = _job(server, job_id).json()
        if record["state"] in states:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout_s} s: {record}")


def _greedy_tokens(sampler, tokenizer) -> list[int]:
    prompt = types.ModelInput.from_ints(tokenizer.encode("Two plus"))
    greedy = types.SamplingParams(max_tokens=5, temperature=0.0)
    return list(sampler.sample(prompt, 1, greedy).result().sequences[0].tokens)


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, model_cache):
    """Train, save, SIGKILL the server during a long job, restart on the same storage folder."""
    storage = tmp_path_factory.mktemp("persistence")
    first = start_server(storage, model_cache)
    try:
        client = make_client(first)
        training = client.create_lora_training_client(base_model=TINY, rank=4, seed=5)
        tokenizer = training.get_tokenizer()
        batch = [_datum(tokenizer, "The capital of France is Paris."), _datum(tokenizer, "Two plus two is four.")]
        trained = training.forward_backward(batch, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        sampler_path = training.save_weights_for_sampler("before-kill").result().path
        state_path = training.save_state("before-kill").result().path
        loss_before_kill = training.forward(batch, "cross_entropy").result().metrics["loss:sum"]
        tokens_before_kill = _greedy_tokens(client.create_sampling_client(model_path=sampler_path), tokenizer)
        forward_backward_id = _only_job_id(first, "forward_backward")

        long_id = httpx.post(first.url("/api/v1/asample"), json=LONG_SAMPLE, timeout=10.0).json()["request_id"]
        running = _wait_for_state(first, long_id, {"running", "succeeded", "failed"})
        assert running["state"] == "running", running
        first.kill()
    except BaseException:
        first.kill()
        raise

    second = start_server(storage, model_cache)
    yield {"server": second, "storage": storage, "model_id": training.model_id, "tokenizer": tokenizer,
           "batch": batch, "trained_loss": trained.metrics["loss:sum"], "forward_backward_id": forward_backward_id,
           "long_id": long_id, "sampler_path": sampler_path, "state_path": state_path,
           "loss_before_kill": loss_before_kill, "tokens_before_kill": tokens_before_kill}
    second.stop()


def test_interrupted_job_reads_failed_after_restart(restarted):
    response = _job(restarted["server"], restarted["long_id"])
    assert response.status_code == 200
    record = response.json()
    assert record["state"] == "failed"
    assert record["error"] == {"message": RESTART_MESSAGE, "category": "server"}
    assert record["finished_at"] is not None


def test_interrupted_job_future_returns_server_error(restarted):
    response = _retrieve(restarted["server"], restarted["long_id"])
    assert response.status_code == 200
    answer = response.json()
    assert answer["error"] == RESTART_MESSAGE
    assert answer["category"] == "server"


def test_restart_logs_recovered_job_count(restarted):
    assert "1 unfinished jobs of the previous run marked failed" in restarted["server"].log()


def test_earlier_result_readable_after_restart(restarted):
    response = _retrieve(restarted["server"], restarted["forward_backward_id"])
    assert response.status_code == 200
    answer = response.json()
    assert answer["metrics"]["loss:sum"] == pytest.approx(restarted["trained_loss"])
    assert len(answer["loss_fn_outputs"]) == len(restarted["batch"])

    record = _job(restarted["server"], restarted["forward_backward_id"]).json()
    assert record["state"] == "succeeded"
    assert record["kind"] == "forward_backward"
    assert record["model_id"] == restarted["model_id"]


def test_sampler_checkpoint_samples_after_restart(restarted):
    client = make_client(restarted["server"])
    sampler = client.create_sampling_client(model_path=restarted["sampler_path"])
    assert _greedy_tokens(sampler, restarted["tokenizer"]) == restarted["tokens_before_kill"]


def test_saved_state_loads_into_new_model_after_restart(restarted):
    client = make_client(restarted["server"])
    training = client.create_lora_training_client(base_model=TINY, rank=4, seed=99)
    training.load_state_with_optimizer(restarted["state_path"]).result()
    loss = training.forward(restarted["batch"], "cross_entropy").result().metrics["loss:sum"]
    assert loss == pytest.approx(restarted["loss_before_kill"], rel=1e-4)


def test_restored_model_listed_as_not_loaded(restarted):
    server, model_id = restarted["server"], restarted["model_id"]
    listed = {model["model_id"]: model for model in httpx.get(server.url("/api/v1/models")).json()["models"]}
    assert model_id in listed
    assert listed[model_id]["loaded"] is False
    assert listed[model_id]["restored"] is True
    assert listed[model_id]["steps"] == 1
    assert set(listed[model_id]["checkpoints"]) == {restarted["sampler_path"], restarted["state_path"]}

    detail = httpx.get(server.url(f"/api/v1/models/{model_id}")).json()
    assert {entry["tinker_path"] for entry in detail["checkpoints"]} == {restarted["sampler_path"],
                                                                          restarted["state_path"]}


def test_restored_model_rejects_training(restarted):
    response = httpx.post(restarted["server"].url("/api/v1/get_info"), json={"model_id": restarted["model_id"]})
    assert response.status_code == 410
    assert "earlier server run" in response.json()["error"]


def test_database_file_contains_job_rows(restarted):
    database = restarted["storage"] / "trainpulse.sqlite3"
    assert database.is_file()
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = dict(connection.execute("SELECT id, state FROM jobs").fetchall())
        result = connection.execute("SELECT result FROM jobs WHERE id = ?",
                                    (restarted["forward_backward_id"],)).fetchone()[0]
    assert rows[restarted["forward_backward_id"]] == "succeeded"
    assert rows[restarted["long_id"]] == "failed"
    assert "loss:sum" in result


def _finished_sample(server) -> str:
    job_id = httpx.post(server.url("/api/v1/asample"), json=SHORT_SAMPLE, timeout=10.0).json()["request_id"]
    assert _retrieve(server, job_id).status_code == 200
    return job_id


def _wait_for_status(server, job_id: str, status: int, timeout_s: float = 10 * RETENTION_S) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = _job(server, job_id)
        if response.status_code == status:
            return response
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still returns {response.status_code}, not {status}: {response.text}")


def test_finished_job_expires_after_retention(fresh_server, tmp_path):
    server = fresh_server(tmp_path / "storage", env={"TRAINPULSE_RETENTION_S": str(RETENTION_S)})
    job_id = _finished_sample(server)
    assert _job(server, job_id).status_code == 200

    response = _wait_for_status(server, job_id, 404)
    assert "expired" in response.json()["error"]
    future = _retrieve(server, job_id)
    assert future.status_code == 404
    assert "expired" in future.json()["error"]


def test_expiry_of_earlier_run_jobs(fresh_server, tmp_path):
    storage = tmp_path / "storage"
    env = {"TRAINPULSE_RETENTION_S": str(RETENTION_S)}
    first = fresh_server(storage, env=env)
    expired_before_stop = _finished_sample(first)
    _wait_for_status(first, expired_before_stop, 404)
    finished_before_stop = _finished_sample(first)
    first.stop()
    time.sleep(RETENTION_S + 0.5)

    second = fresh_server(storage, env=env)
    for job_id in (expired_before_stop, finished_before_stop):
        response = _job(second, job_id)
        assert response.status_code == 404, job_id
        assert "expired" in response.json()["error"], job_id
    unknown = _job(second, "00000000-0000-0000-0000-000000000000")
    assert unknown.status_code == 404
    assert "not found" in unknown.json()["error"]


def _stored_job(job_id: str, state: JobState, *, finished_ago_s: float | None = None, result=None) -> Job:
    now = time.time()
    job = Job(id=job_id, kind="sample", model_id=None, session_id="session-1", seq_id=None, created_at=now - 60,
              expires_at=now + 3600, state=state, result=result, started_at=now - 30, updated_at=now)
    if finished_ago_s is not None:
        job.finished_at = now - finished_ago_s
    return job


def _reopened(path, retention_s: float = 3600.0) -> tuple[SqliteJobStore, int]:
    store = SqliteJobStore(path, retention_s=retention_s)
    return store, store.open()


def test_store_load_reads_pending_save(tmp_path):
    store = SqliteJobStore(tmp_path / "db.sqlite3", retention_s=3600.0)
    # Before open() no writer runs, so the record can only come from the pending snapshots.
    store.save(_stored_job("a", JobState.SUCCEEDED, finished_ago_s=1, result={"value": 1}))
    loaded = store.load("a")
    assert loaded is not None
    assert loaded.state is JobState.SUCCEEDED
    assert loaded.result == {"value": 1}


def test_store_close_writes_pending_records(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    for index in range(50):
        store.save(_stored_job(f"job-{index}", JobState.RUNNING))
        store.save(_stored_job(f"job-{index}", JobState.SUCCEEDED, finished_ago_s=0, result={"index": index}))
    store.close()

    reopened, recovered = _reopened(path)
    assert recovered == 0
    for index in range(50):
        loaded = reopened.load(f"job-{index}")
        assert loaded is not None, index
        assert loaded.state is JobState.SUCCEEDED, index
        assert loaded.result == {"index": index}
    reopened.close()


def test_store_keeps_terminal_row_over_later_running_save(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    store.save(_stored_job("a", JobState.FAILED, finished_ago_s=0))
    store.close()
    store, _ = _reopened(path)
    store.save(_stored_job("a", JobState.RUNNING))
    store.close()

    reopened, recovered = _reopened(path)
    assert recovered == 0
    assert reopened.load("a").state is JobState.FAILED
    reopened.close()


def test_store_open_fails_unfinished_jobs(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    store.save(_stored_job("queued", JobState.QUEUED))
    store.save(_stored_job("running", JobState.RUNNING))
    store.save(_stored_job("done", JobState.SUCCEEDED, finished_ago_s=0, result=[1, 2]))
    store.close()

    reopened, recovered = _reopened(path)
    assert recovered == 2
    for job_id in ("queued", "running"):
        loaded = reopened.load(job_id)
        assert loaded.state is JobState.FAILED, job_id
        assert loaded.error == {"message": RESTART_MESSAGE, "category": "server"}, job_id
        assert loaded.finished_at is not None, job_id
    assert reopened.load("done").result == [1, 2]
    reopened.close()


def test_store_open_expires_jobs_past_retention(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    store.save(_stored_job("old", JobState.SUCCEEDED, finished_ago_s=120, result={}))
    store.save(_stored_job("new", JobState.SUCCEEDED, finished_ago_s=0, result={}))
    store.close()

    reopened, _ = _reopened(path, retention_s=60.0)
    assert reopened.is_expired("old")
    assert reopened.load("old") is None
    assert not reopened.is_expired("new")
    assert reopened.load("new") is not None
    reopened.close()


def test_store_mark_expired_hides_job_at_once(tmp_path):
    store, _ = _reopened(tmp_path / "db.sqlite3")
    store.save(_stored_job("a", JobState.SUCCEEDED, finished_ago_s=0, result={}))
    store.mark_expired(["a"])
    assert store.is_expired("a")
    assert store.load("a") is None
    assert not store.is_expired("unknown")
    store.close()


def test_store_model_records_round_trip(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    store.save_model({"model_id": "model-1", "steps": 1})
    store.save_model({"model_id": "model-1", "steps": 2})
    store.save_model({"model_id": "model-2", "steps": 0})
    store.close()

    reopened, _ = _reopened(path)
    assert reopened.load_models() == [{"model_id": "model-1", "steps": 2}, {"model_id": "model-2", "steps": 0}]
    reopened.close()


def test_store_writes_out_of_range_seq_id_as_null(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    huge = _stored_job("huge", JobState.SUCCEEDED, finished_ago_s=0, result={})
    huge.seq_id = 2**70
    store.save(huge)
    store.close()
    store, _ = _reopened(path)
    store.save(_stored_job("normal", JobState.SUCCEEDED, finished_ago_s=0, result={"value": 1}))
    store.close()

    reopened, _ = _reopened(path)
    stored_huge = reopened.load("huge")
    assert stored_huge is not None
    assert stored_huge.seq_id is None
    assert stored_huge.state is JobState.SUCCEEDED
    assert reopened.load("normal").result == {"value": 1}
    reopened.close()


def test_store_writer_survives_unwritable_records(tmp_path):
    path = tmp_path / "db.sqlite3"
    store, _ = _reopened(path)
    # A model record that is not JSON and a job whose NOT NULL column is missing fail in the writer
    # thread, the first with TypeError and the second with sqlite3.IntegrityError.
    store.save_model({"model_id": "model-bad", "tokenizer": object()})
    broken = _stored_job("broken", JobState.SUCCEEDED, finished_ago_s=0, result={})
    broken.created_at = None
    store.save(broken)
    store.save_model({"model_id": "model-good", "steps": 1})
    store.save(_stored_job("good", JobState.SUCCEEDED, finished_ago_s=0, result={"value": 1}))
    _wait_until_written(path, "good")
    # A record saved after the failures is written too, so the writer thread is still running.
    store.save(_stored_job("later", JobState.SUCCEEDED, finished_ago_s=0, result={"value": 2}))
    _wait_until_written(path, "later")
    store.close()

    reopened, _ = _reopened(path)
    assert reopened.load_models() == [{"model_id": "model-good", "steps": 1}]
    assert reopened.load("broken") is None
    assert reopened.load("good").result == {"value": 1}
    assert reopened.load("later").result == {"value": 2}
    reopened.close()


def _wait_until_written(path, job_id: str, timeout_s: float = 10.0) -> None:
    """Poll the database file on a connection of its own until the job's row is committed."""
    deadline = time.monotonic() + timeout_s
    with sqlite3.connect(path) as db:
        while time.monotonic() < deadline:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None:
                return
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} was not written to {path} within {timeout_s} s")


def test_repair_restores_checkpoint_of_interrupted_overwrite(tmp_path):
    # The folders a crash leaves mid-save are built by hand, since a kill cannot be timed to land
    # between the two renames of an overwrite.
    kind_folder = tmp_path / "model-1" / "weights"
    retired = kind_folder / ".step.old"
    retired.mkdir(parents=True)
    (retired / METADATA_FILE).write_text('{"path": "tinker://model-1/weights/step", "created_at": 1.0}')
    (kind_folder / "step").mkdir()  # the new version, renamed into place before its metadata
    staging = kind_folder / ".other.abc123.tmp"
    staging.mkdir()

    repair_checkpoint_folders(tmp_path)

    assert (kind_folder / "step" / METADATA_FILE).is_file()
    assert not retired.exists()
    assert not staging.exists()
    assert [entry["tinker_path"] for entry in CheckpointService(tmp_path).list_for_model("model-1")] == [
        "tinker://model-1/weights/step"]
