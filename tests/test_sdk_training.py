"""The unmodified tinker SDK drives a full SFT-and-sample loop against a real server."""

from __future__ import annotations

import httpx
import pytest
import tinker
from tinker import types

from conftest import TINY


def _datum(tokenizer, text: str) -> types.Datum:
    ids = tokenizer.encode(text)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})


@pytest.fixture(scope="module")
def trained(server):
    """One LoRA model trained for a few steps on a fixed batch, shared by the tests below."""
    client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-trainpulse-tests")
    training = client.create_lora_training_client(base_model=TINY, rank=8, seed=3)
    tokenizer = training.get_tokenizer()
    batch = [_datum(tokenizer, "The capital of France is Paris."),
             _datum(tokenizer, "Two plus two equals four.")]
    losses = []
    for _ in range(6):
        forward_backward = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(forward_backward.result().metrics["loss:sum"])
        optim.result()
    return {"client": client, "training": training, "tokenizer": tokenizer, "batch": batch, "losses": losses}


def test_sdk_loss_falls_over_steps(trained):
    losses = trained["losses"]
    assert losses[-1] < losses[0] * 0.8, losses


def test_forward_matches_training_loss_shape(trained):
    batch = trained["batch"]
    output = trained["training"].forward(batch, "cross_entropy").result()
    assert len(output.loss_fn_outputs) == len(batch)
    for datum, per_datum in zip(batch, output.loss_fn_outputs):
        assert len(per_datum["logprobs"].tolist()) == datum.model_input.length
        assert all(value <= 0 for value in per_datum["logprobs"].tolist())
    assert output.metrics["loss:sum"] > 0


def test_unnamed_sampler_samples(trained):
    sampler = trained["training"].save_weights_and_get_sampling_client()
    prompt = types.ModelInput.from_ints(trained["tokenizer"].encode("The capital of"))
    result = sampler.sample(prompt, num_samples=3,
                            sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)).result()
    assert len(result.sequences) == 3
    for sequence in result.sequences:
        assert 1 <= len(sequence.tokens) <= 6
        assert len(sequence.logprobs) == len(sequence.tokens)
        assert sequence.stop_reason in ("length", "stop")


def test_named_sampler_weights_load_by_path(trained):
    saved = trained["training"].save_weights_for_sampler("after-six-steps").result()
    model_id = trained["training"].model_id
    assert saved.path == f"tinker://{model_id}/sampler_weights/after-six-steps"
    sampler = trained["client"].create_sampling_client(model_path=saved.path)
    prompt = types.ModelInput.from_ints(trained["tokenizer"].encode("Two plus"))
    greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
    first = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    second = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    assert first == second


def test_get_info_tokenizer_loads_offline(trained):
    info = trained["training"].get_info()
    assert info.model_data.model_name == TINY
    assert trained["tokenizer"].encode("hello")


def test_capabilities_list_catalogue(server):
    client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-trainpulse-tests")
    capabilities = client.get_server_capabilities()
    assert TINY in [model.model_name for model in capabilities.supported_models]


def test_token_beyond_vocab_fails_clearly(trained, server):
    training = trained["training"]
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 10_000_000]),
                      loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    with pytest.raises(tinker.RequestFailedError) as failure:
        training.forward_backward([bad], "cross_entropy").result()
    assert "outside the vocabulary" in str(failure.value)
    # The same model keeps training after the bad request.
    assert training.forward_backward(trained["batch"], "cross_entropy").result().metrics["loss:sum"] > 0
    training.optim_step(types.AdamParams(learning_rate=0.0)).result()


def test_unknown_model_id_is_404_json(server):
    response = httpx.post(server.url("/api/v1/forward_backward"), json={
        "model_id": "model-does-not-exist", "seq_id": 1,
        "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
            {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [2, 3], "dtype": "int64"}}}]}})
    assert response.status_code == 404
    body = response.json()
    assert body["field"] == "model_id"
    assert "not found" in body["error"]
    assert httpx.get(server.url("/api/v1/healthz")).json() == {"status": "ok"}


def test_unnamed_sampler_weights_are_pruned(trained, server):
    training = trained["training"]
    prompt = types.ModelInput.from_ints(trained["tokenizer"].encode("Two plus"))
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    samplers = [training.save_weights_and_get_sampling_client() for _ in range(6)]
    folder = server.storage_dir / "checkpoints" / training.model_id / "sampler_weights"
    unnamed = [entry for entry in folder.iterdir() if entry.name.startswith("ephemeral-")]
    assert len(unnamed) == 4
    assert len(samplers[-1].sample(prompt, 1, params).result().sequences) == 1
    with pytest.raises(tinker.APIStatusError) as failure:
        samplers[0].sample(prompt, 1, params).result()
    assert "were deleted" in str(failure.value)
