"""Server-side SFT jobs (POST /api/v1/jobs) on a real server, with models made by the tinker SDK."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from tinker import types

from conftest import TINY, make_client

DATA = Path(__file__).resolve().parent / "data"
CHAT_FILE = "sft_chat.jsonl"
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}
JOB_WAIT_S = 120.0


@pytest.fixture(scope="module")
def data_server(server):
    """The shared server, with the chat dataset in its default data folder (<storage>/data)."""
    data_dir = server.storage_dir / "data"
    data_dir.mkdir(exist_ok=True)
    shutil.copy(DATA / CHAT_FILE, data_dir / CHAT_FILE)
    return server


def _create_model(server, seed: int = 5) -> str:
    training = make_client(server).create_lora_training_client(base_model=TINY, rank=8, seed=seed)
    return training.model_id


def _submit(server, body: dict) -> httpx.Response:
    # json.dumps writes NaN and Infinity as Python's json module reads them, so a test can send them.
    return httpx.post(server.url("/api/v1/jobs"), content=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=60.0)


def _sft_body(model_id: str, **overrides) -> dict:
    body = {"kind": "sft", "model_id": model_id, "dataset": {"path": CHAT_FILE}, "steps": 4, "batch_size": 1,
            "learning_rate": 5e-3, "seed": 1}
    body.update(overrides)
    return body


def _watch(server, job_id: str, until=lambda record: record["state"] in TERMINAL) -> tuple[dict, list[dict]]:
    """Poll the job record until `until` is true, and return the last record and every record seen."""
    seen = []
    deadline = time.monotonic() + JOB_WAIT_S
    while time.monotonic() < deadline:
        record = httpx.get(server.url(f"/api/v1/jobs/{job_id}"), timeout=10.0).json()
        seen.append(record)
        if until(record):
            return record, seen
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach the expected state in {JOB_WAIT_S} s: {seen[-1]}")


def _checkpoints(server, model_id: str) -> list[str]:
    answer = httpx.get(server.url(f"/api/v1/training_runs/{model_id}/checkpoints"), timeout=10.0).json()
    return sorted(entry["tinker_path"] for entry in answer["checkpoints"])


def _loss_history(server, model_id: str) -> list[float]:
    answer = httpx.get(server.url(f"/api/v1/models/{model_id}/metrics"), params={"name": "loss"}, timeout=10.0)
    assert answer.status_code == 200, answer.text
    return [point["value"] for point in answer.json()["points"]]


def test_sft_file_job_progress_and_loss(data_server):
    model_id = _create_model(data_server)

    answer = _submit(data_server, _sft_body(model_id, steps=10, batch_size=4, learning_rate=1e-2,
                                                      warmup_steps=2, lr_schedule="cosine"))
    assert answer.status_code == 202, answer.text
    submitted = answer.json()
    assert submitted["job"]["kind"] == "sft"
    assert submitted["job"]["model_id"] == model_id
    assert submitted["job"]["id"] == submitted["request_id"]

    final, seen = _watch(data_server, submitted["request_id"])
    assert final["state"] == "succeeded", final
    assert final["progress"]["completed"] == 10
    assert final["progress"]["total"] == 10
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s"} <= set(final["metrics"])
    running = [record["progress"]["completed"] for record in seen if record["state"] == "running"]
    assert any(0 < completed < 10 for completed in running), running
    assert running == sorted(running)
    assert any(record["progress"]["eta_s"] for record in seen if record["state"] == "running")

    losses = _loss_history(data_server, model_id)
    assert len(losses) == 10
    assert losses[-1] < losses[0] * 0.8, losses
    model = httpx.get(data_server.url(f"/api/v1/models/{model_id}"), timeout=10.0).json()
    assert model["steps"] == 10


def test_sft_learning_rate_follows_schedule(data_server):
    model_id = _create_model(data_server)
    answer = _submit(data_server, _sft_body(model_id, steps=4, warmup_steps=2, lr_schedule="linear",
                                            learning_rate=1e-3))
    final, _ = _watch(data_server, answer.json()["request_id"])
    assert final["state"] == "succeeded", final

    rates = httpx.get(data_server.url(f"/api/v1/models/{model_id}/metrics"), params={"name": "learning_rate"},
                      timeout=10.0).json()["points"]
    # Warmup 5e-4, 1e-3, then linear decay over the two remaining steps: 1e-3, 5e-4.
    assert [round(point["value"], 9) for point in rates] == [5e-4, 1e-3, 1e-3, 5e-4]


def test_sft_inline_prompt_completion_epochs(data_server):
    model_id = _create_model(data_server)
    rows = [{"prompt": "Question: what is ice?\nAnswer:", "completion": " Frozen water."},
            {"prompt": "Question: what is snow?\nAnswer:", "completion": " Frozen rain."},
            {"prompt": "Question: what is steam?\nAnswer:", "completion": " Hot water vapour."}]

    answer = _submit(data_server, _sft_body(model_id, dataset={"inline": rows}, steps=None, epochs=3, batch_size=2))
    assert answer.status_code == 202, answer.text
    final, _ = _watch(data_server, answer.json()["request_id"])

    assert final["state"] == "succeeded", final
    assert final["progress"]["total"] == 5  # ceil(3 epochs * 3 rows / 2 per batch)
    assert final["metrics"]["loss"] > 0


def test_sft_save_every_writes_checkpoints(data_server):
    model_id = _create_model(data_server)
    answer = _submit(data_server, _sft_body(model_id, steps=5, save_every=2))
    request_id = answer.json()["request_id"]
    final, _ = _watch(data_server, request_id)
    assert final["state"] == "succeeded", final

    expected = [f"tinker://{model_id}/weights/sft-step-{step}" for step in (2, 4, 5)]
    assert _checkpoints(data_server, model_id) == sorted(expected)
    result = httpx.post(data_server.url("/api/v1/retrieve_future"), json={"request_id": request_id},
                        timeout=30.0).json()
    assert result["checkpoints"] == expected


def test_sft_cancel_saves_loadable_checkpoint(data_server):
    client = make_client(data_server)
    training = client.create_lora_training_client(base_model=TINY, rank=8, seed=9)
    model_id = training.model_id
    answer = _submit(data_server, _sft_body(model_id, steps=5000, save_on_cancel=True))
    job_id = answer.json()["request_id"]

    _watch(data_server, job_id, until=lambda record: record["progress"]["completed"] >= 2
           or record["state"] in TERMINAL)
    cancelled = httpx.post(data_server.url(f"/api/v1/jobs/{job_id}/cancel"), timeout=10.0)
    assert cancelled.status_code == 200, cancelled.text
    final, _ = _watch(data_server, job_id)

    assert final["state"] == "cancelled", final
    steps = httpx.get(data_server.url(f"/api/v1/models/{model_id}"), timeout=10.0).json()["steps"]
    assert 2 <= steps < 5000
    # The checkpoint contains the model after its last whole step: no step was left half applied.
    checkpoint = f"tinker://{model_id}/weights/sft-step-{steps}"
    assert _checkpoints(data_server, model_id) == [checkpoint]

    tokenizer = training.get_tokenizer()
    sampler = client.create_sampling_client(model_path=checkpoint)
    prompt = types.ModelInput.from_ints(tokenizer.encode("What do bees make?"))
    sample = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert 1 <= len(sample.sequences[0].tokens) <= 4

    # The lane is free again and the model takes ordinary SDK steps.
    ids = tokenizer.encode("Paris is in France.")
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    assert training.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert httpx.get(data_server.url(f"/api/v1/models/{model_id}"), timeout=10.0).json()["steps"] == steps + 1


def test_sft_dataset_path_stays_in_data_dir(fresh_server, tmp_path):
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    shutil.copy(DATA / CHAT_FILE, data_dir / CHAT_FILE)
    outside = tmp_path / "outside.jsonl"
    shutil.copy(DATA / CHAT_FILE, outside)
    (data_dir / "link.jsonl").symlink_to(outside)
    running = fresh_server(env={"TRAINPULSE_DATA_DIR": str(data_dir)})
    model_id = _create_model(running)

    for path in ("../outside.jsonl", str(outside), "link.jsonl"):
        answer = _submit(running, _sft_body(model_id, dataset={"path": path}))
        assert answer.status_code == 400, (path, answer.text)
        assert answer.json()["field"] == "dataset.path", path

    missing = _submit(running, _sft_body(model_id, dataset={"path": "missing.jsonl"}))
    assert missing.status_code == 404, missing.text
    assert missing.json()["field"] == "dataset.path"

    accepted = _submit(running, _sft_body(model_id, steps=1))
    assert accepted.status_code == 202, accepted.text
    assert _watch(running, accepted.json()["request_id"])[0]["state"] == "succeeded"


def test_sft_rejects_bad_rows_by_number(data_server):
    model_id = _create_model(data_server)
    (data_server.storage_dir / "data" / "broken.jsonl").write_text(
        (DATA / CHAT_FILE).read_text() + '{"messages": [{"role": "user", "content": "no answer"}]}\n')

    answer = _submit(data_server, _sft_body(model_id, dataset={"path": "broken.jsonl"}))
    assert answer.status_code == 400, answer.text
    assert "line 9" in answer.json()["error"]
    assert answer.json()["field"] == "dataset.path"

    rows = [{"prompt": "a", "completion": "b"}, {"text": "no prompt"}]
    answer = _submit(data_server, _sft_body(model_id, dataset={"inline": rows}))
    assert answer.status_code == 400, answer.text
    assert "dataset.inline[1]" in answer.json()["error"]


def test_sft_rejects_rows_over_max_length(data_server):
    model_id = _create_model(data_server)
    rows = [{"prompt": "word " * 50, "completion": "end"}]
    answer = _submit(data_server, _sft_body(model_id, dataset={"inline": rows}, max_length=16))
    assert answer.status_code == 400, answer.text
    assert "max_length 16" in answer.json()["error"]


@pytest.fixture(scope="module")
def untrained_model(data_server) -> str:
    """One model for the validation cases, which never train it."""
    return _create_model(data_server)


@pytest.mark.parametrize(("change", "status", "field"), [
    ({"kind": "rl"}, 400, "kind"),
    ({"model_id": None}, 400, "model_id"),
    ({"model_id": "model-doesnotexist"}, 404, "model_id"),
    ({"epochs": 2}, 400, "steps"),
    ({"steps": None}, 400, "steps"),
    ({"batch_size": 0}, 400, "batch_size"),
    ({"learning_rate": -1.0}, 400, "learning_rate"),
    ({"lr_schedule": "exponential"}, 400, "lr_schedule"),
    ({"dataset": {"inline": []}}, 400, "dataset.inline"),
    ({"dataset": {}}, 400, "dataset"),
    ({"adam": {"beta1": 1.5}}, 400, "adam.beta1"),
    ({"stepz": 3}, 400, "stepz"),
    ({"batch_size": 1_000_000_000}, 400, "batch_size"),
    ({"batch_size": 1025}, 400, "batch_size"),
    ({"steps": 1_000_001}, 400, "steps"),
    ({"steps": None, "epochs": 10**12}, 400, "epochs"),
    # 8 rows in batches of 1 for a million epochs make 8 million steps.
    ({"steps": None, "epochs": 1_000_000}, 400, "epochs"),
    ({"warmup_steps": 10**12}, 400, "warmup_steps"),
    ({"save_every": 10**12}, 400, "save_every"),
    ({"seed": 2**70}, 400, "seed"),
    ({"learning_rate": 1e300}, 400, "learning_rate"),
    ({"timeout_s": 1e300}, 400, "timeout_s"),
    ({"adam": {"eps": 0.0}}, 400, "adam.eps"),
    ({"dataset": {"path": "ok.jsonl\u0000.txt"}}, 400, "dataset.path"),
    ({"dataset": {"path": "x" * 5000 + ".jsonl"}}, 400, "dataset.path"),
])
def test_sft_request_validation(data_server, untrained_model, change, status, field):
    body = {**_sft_body(untrained_model), **change}
    body = {key: value for key, value in body.items() if value is not None}

    answer = _submit(data_server, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field, answer.json()


def test_sft_request_rejects_nan_body(data_server, untrained_model):
    answer = _submit(data_server, _sft_body(untrained_model, learning_rate=float("nan")))
    assert answer.status_code == 400, answer.text


@pytest.mark.parametrize(("change", "field"), [
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"adam": {"weight_decay": float("inf")}}, "adam.weight_decay"),
    ({"adam": {"grad_clip_norm": float("nan")}}, "adam.grad_clip_norm"),
    ({"adam": {"beta1": float("nan")}}, "adam.beta1"),
])
def test_sft_schema_rejects_non_finite_floats(change, field):
    # The HTTP layer already rejects NaN and Infinity in the JSON text, so the schema is checked on
    # its own here, as a caller that builds the request in Python would use it.
    from pydantic import ValidationError

    from server.api.sft import SftJobRequest

    with pytest.raises(ValidationError) as caught:
        SftJobRequest.model_validate({**_sft_body("model-x"), **change})
    fields = [".".join(str(part) for part in error["loc"]) for error in caught.value.errors()]
    assert fields == [field]


def test_chat_row_trains_only_assistant_tokens(model_cache):
    from transformers import AutoTokenizer

    from server.engine.catalogue import Catalogue
    from server.services.sft import _tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(Catalogue(model_cache).resolve(TINY).tokenizer_dir)
    row = json.loads((DATA / CHAT_FILE).read_text().splitlines()[2])
    tokenized = _tokenize_row(tokenizer, row, "row", "dataset.inline")

    trained = [token for token, weight in zip(tokenized.tokens, tokenized.weights) if weight]
    assert tokenizer.decode(trained) == "Paris.<|im_end|>\n"
    assert len(tokenized.weights) == len(tokenized.tokens)


def test_batch_order_cycles_rows_past_dataset_size():
    from server.services.sft import _BatchOrder

    order = _BatchOrder(row_count=3, batch_size=1024, seed=7)
    first, second = order.next_batch(), order.next_batch()

    assert len(first) == 1024
    assert len(second) == 1024
    # 2048 indices are 682 whole epochs and 2 rows of the next, and each epoch is a permutation.
    indices = first + second
    for start in range(0, 2046, 3):
        assert sorted(indices[start:start + 3]) == [0, 1, 2], start


def test_batch_order_matches_seeded_epoch_shuffles():
    import random

    from server.services.sft import _BatchOrder

    order = _BatchOrder(row_count=5, batch_size=3, seed=11)
    batches = [order.next_batch() for _ in range(5)]

    generator = random.Random(11)
    expected = []
    for _ in range(3):
        epoch = list(range(5))
        generator.shuffle(epoch)
        expected += epoch
    assert [index for batch in batches for index in batch] == expected[:15]


def test_batch_order_cost_does_not_grow_with_dataset():
    from server.services.sft import _BatchOrder

    # 20,000 single-row batches from 200,000 rows take one shuffle here, about 0.2 s, but copying
    # the rest of the epoch for each batch would take tens of seconds.
    order = _BatchOrder(row_count=200_000, batch_size=1, seed=0)
    started = time.perf_counter()
    for _ in range(20_000):
        order.next_batch()
    assert time.perf_counter() - started < 5.0
