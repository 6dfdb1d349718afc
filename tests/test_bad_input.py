"""Bad input gets a clear 4xx JSON error naming the field, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import TINY
from server.api.json_provider import finite_or_null


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def session_id(http):
    return http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]


def _wait(http, request_id: str) -> httpx.Response:
    for _ in range(10):
        answer = http.post("/api/v1/retrieve_future", json={"request_id": request_id})
        if answer.status_code != 408:
            return answer
    raise AssertionError(f"request {request_id} did not end")


@pytest.fixture(scope="module")
def model_id(http, session_id):
    created = http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": TINY,
                                                      "lora_config": {"rank": 4}})
    return _wait(http, created.json()["request_id"]).json()["model_id"]


def _forward_backward(model_id: str, seq_id) -> dict:
    return {"model_id": model_id, "seq_id": seq_id, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
        {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
         "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"}}}]}}


def _assert_field(response: httpx.Response, status: int, field: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field, body
    return body


def test_seq_id_beyond_int64_rejected(http, model_id):
    response = http.post("/api/v1/optim_step", json={"model_id": model_id, "adam_params": {},
                                                      "seq_id": 2**70})
    _assert_field(response, 400, "seq_id")


def test_infinity_literal_rejected(http, model_id):
    body = '{"model_id": "%s", "adam_params": {}, "timeout_s": Infinity}' % model_id
    response = http.post("/api/v1/optim_step", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "Infinity" in response.json()["error"]


def test_infinite_learning_rate_rejected(http, model_id):
    # 1e999 is valid JSON that overflows to infinity when parsed.
    body = '{"model_id": "%s", "adam_params": {"learning_rate": 1e999}}' % model_id
    response = http.post("/api/v1/optim_step", content=body, headers={"Content-Type": "application/json"})
    _assert_field(response, 400, "adam_params.learning_rate")


def test_lora_seed_beyond_int64_rejected(http, session_id):
    response = http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": TINY,
                                                        "lora_config": {"rank": 2, "seed": 2**70}})
    _assert_field(response, 400, "lora_config.seed")


def test_oversized_user_metadata_rejected(http, session_id):
    response = http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": TINY,
                                                        "lora_config": {"rank": 2},
                                                        "user_metadata": {"blob": "x" * 100_000}})
    _assert_field(response, 400, "user_metadata")


def test_deeply_nested_body_rejected(http):
    body = '{"tags": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = http.post("/api/v1/create_session", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["error"]


def test_reused_seq_id_of_other_kind_conflicts(http, model_id):
    first = http.post("/api/v1/optim_step", json={"model_id": model_id, "adam_params": {}, "seq_id": 1})
    assert first.status_code == 200
    reused = http.post("/api/v1/forward_backward", json=_forward_backward(model_id, 1))
    body = _assert_field(reused, 409, "seq_id")
    assert "optim_step" in body["error"]
    assert _wait(http, first.json()["request_id"]).status_code == 200


def test_checkpoint_path_of_other_model_rejected(http, model_id):
    response = http.post("/api/v1/save_weights", json={"model_id": model_id,
                                                        "path": "tinker://model-other/weights/x"})
    _assert_field(response, 400, "path")
    traversal = http.post("/api/v1/save_weights", json={"model_id": model_id, "path": "../../evil"})
    _assert_field(traversal, 400, "path")


def test_unknown_model_routes_are_404(http):
    for path in ("/api/v1/models/model-nope/metrics", "/api/v1/training_runs/model-nope/checkpoints"):
        _assert_field(http.get(path), 404, "model_id")


def test_unknown_request_id_names_field(http):
    response = http.post("/api/v1/retrieve_future", json={"request_id": "no-such-request"})
    _assert_field(response, 404, "request_id")


def test_finished_session_takes_no_new_model(http):
    session = http.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    first = http.post(f"/api/v1/sessions/{session}/finish").json()["finished_at"]
    again = http.post(f"/api/v1/sessions/{session}/finish").json()["finished_at"]
    assert first == again
    response = http.post("/api/v1/create_model", json={"session_id": session, "base_model": TINY,
                                                        "lora_config": {"rank": 2}})
    _assert_field(response, 409, "session_id")


def test_sampling_session_needs_known_session(http):
    response = http.post("/api/v1/create_sampling_session", json={"session_id": "session-nope",
                                                                   "base_model": TINY})
    _assert_field(response, 404, "session_id")


def test_failed_create_model_reports_failure(http, session_id, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    created = http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": str(broken),
                                                       "lora_config": {"rank": 2}})
    assert created.status_code == 200
    failed = _wait(http, created.json()["request_id"]).json()
    assert "error" in failed
    info = http.post("/api/v1/get_info", json={"model_id": created.json()["model_id"]})
    body = _assert_field(info, 410, "model_id")
    assert "could not be created" in body["error"]


def test_bad_sparse_tensor_fails_as_user_error(http, model_id):
    request = _forward_backward(model_id, None)
    request["forward_backward_input"]["data"][0]["loss_fn_inputs"]["weights"] = {
        "data": [1.0], "dtype": "float32", "shape": [1, 3], "sparse_crow_indices": [0, 5],
        "sparse_col_indices": [9, 9]}
    submitted = http.post("/api/v1/forward_backward", json=request)
    assert submitted.status_code == 200
    answer = _wait(http, submitted.json()["request_id"]).json()
    assert answer["category"] == "user"
    assert "invalid tensor" in answer["error"]


def test_non_finite_numbers_become_null():
    shaped = finite_or_null({"loss": float("nan"), "values": [1.0, float("inf"), -float("inf")], "n": 3})
    assert json.loads(json.dumps(shaped, allow_nan=False)) == {"loss": None, "values": [1.0, None, None], "n": 3}


def test_server_still_serves_after_bad_input(http):
    assert http.get("/api/v1/healthz").json() == {"status": "ok"}
