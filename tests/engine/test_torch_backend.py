"""TorchBackend on the catalogue's tiny random Llama (hidden 64, 2 layers, tied embeddings, vocab 49152)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine.backend import AdamParams, Example, LoraSpec, SamplingParams, no_progress
from server.engine.catalogue import TINY_NAME, Catalogue
from server.engine.torch_backend import TorchBackend
from server.errors import ConflictError, JobCancelledError, NotFoundError, UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def reference_model(catalogue: Catalogue):
    return AutoModelForCausalLM.from_pretrained(str(catalogue.resolve(TINY_NAME).model_dir), dtype=torch.float32).eval()


@pytest.fixture
def backend(catalogue: Catalogue) -> TorchBackend:
    # A small micro-batch bound, so that a few short examples already span several micro-batches.
    return TorchBackend(catalogue.resolve, micro_batch_tokens=8)


def make_example(tokens: list[int], targets: list[int], **extra: list[float]) -> Example:
    inputs = {"target_tokens": torch.tensor(targets, dtype=torch.int64)}
    inputs.update({name: torch.tensor(values, dtype=torch.float32) for name, values in extra.items()})
    return Example(tokens=tokens, loss_inputs=inputs)


def batch() -> list[Example]:
    return [
        make_example([10, 20, 30, 40, 50, 60], [20, 30, 40, 50, 60, 70]),
        make_example([11, 21, 31], [21, 31, 41]),
        make_example([12, 22, 32, 42, 52], [22, 32, 42, 52, 62]),
        make_example([13, 23], [23, 33]),
    ]


def create(backend: TorchBackend, model_id: str, **lora: object):
    options = {"rank": 4, "seed": 0, **lora}
    return backend.create_model(model_id, TINY_NAME, LoraSpec(**options))


def train_step(backend: TorchBackend, model_id: str, examples: list[Example], learning_rate: float = 1e-2) -> float:
    result = backend.forward_backward(model_id, examples, "cross_entropy", None, no_progress)
    backend.optim_step(model_id, AdamParams(learning_rate=learning_rate), no_progress)
    return result.metrics["loss:sum"]


def adapter_params(backend: TorchBackend, model_id: str) -> list[torch.nn.Parameter]:
    return backend._models[model_id].params


def manual_logprobs(model, tokens: list[int], targets: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens)), torch.tensor(targets)]


class CancelAt:
    """Progress callback that raises JobCancelledError at one (phase, completed) boundary."""

    def __init__(self, phase: str, completed: int) -> None:
        self.phase, self.completed = phase, completed

    def __call__(self, phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None:
        if (phase, completed) == (self.phase, self.completed):
            raise JobCancelledError("cancelled by the test")


# Model lifecycle and LoRA options


def test_create_model_reports_model_info(backend: TorchBackend, catalogue: Catalogue):
    info = create(backend, "m1", rank=8)

    assert info.lora_rank == 8
    assert info.vocab_size == 49152
    assert info.max_context == 8192
    assert info.tokenizer_dir == catalogue.resolve(TINY_NAME).tokenizer_dir
    assert backend.model_info("m1") == info


@pytest.mark.parametrize("options, expected", [
    ({"train_attn": True, "train_mlp": False, "train_unembed": False}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ({"train_attn": False, "train_mlp": True, "train_unembed": False}, {"gate_proj", "up_proj", "down_proj"}),
    ({"train_attn": False, "train_mlp": False, "train_unembed": True}, {"lm_head"}),
])
def test_lora_options_select_target_modules(backend: TorchBackend, options: dict, expected: set[str]):
    create(backend, "m1", **options)

    names = [name for name, _ in backend._models["m1"].base.peft.named_parameters() if "lora_" in name]
    targeted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert targeted == expected


def test_lora_all_options_false_rejected(backend: TorchBackend):
    with pytest.raises(UserError, match="train nothing"):
        create(backend, "m1", train_attn=False, train_mlp=False, train_unembed=False)


@pytest.mark.parametrize("rank", [0, -1, 100_000])
def test_lora_invalid_rank_rejected(backend: TorchBackend, rank: int):
    with pytest.raises(UserError, match="rank"):
        create(backend, "m1", rank=rank)


def test_same_seed_gives_identical_initial_adapter(backend: TorchBackend):
    create(backend, "a", seed=7)
    create(backend, "b", seed=7)
    create(backend, "c", seed=8)

    for first, second in zip(adapter_params(backend, "a"), adapter_params(backend, "b")):
        assert torch.equal(first, second)
    lora_a = [p for p in adapter_params(backend, "a") if p.abs().sum() > 0]
    lora_c = [p for p in adapter_params(backend, "c") if p.abs().sum() > 0]
    assert lora_a, "lora_A weights start random, so some adapter weights are non-zero"
    assert not all(torch.equal(x, y) for x, y in zip(lora_a, lora_c))


def test_models_on_one_base_share_base_weights(backend: TorchBackend):
    create(backend, "a")
    create(backend, "b")

    first, second = backend._models["a"], backend._models["b"]
    assert len(backend._bases) == 1
    assert first.base is second.base
    attention = first.base.model.model.layers[0].self_attn.q_proj
    assert attention.base_layer.weight.data_ptr() == second.base.model.model.layers[0].self_attn.q_proj.base_layer.weight.data_ptr()
    assert {"train_a", "train_b"} <= set(attention.lora_A.keys())


def test_training_one_model_leaves_other_unchanged(backend: TorchBackend):
    create(backend, "a")
    create(backend, "b")
    before = backend.forward("b", batch(), "cross_entropy", None, no_progress)

    for _ in range(2):
        train_step(backend, "a", batch())

    after = backend.forward("b", batch(), "cross_entropy", None, no_progress)
    trained = backend.forward("a", batch(), "cross_entropy", None, no_progress)
    assert after.metrics == before.metrics
    assert trained.metrics["loss:sum"] < before.metrics["loss:sum"]


def test_concurrent_calls_match_sequential(backend: TorchBackend):
    create(backend, "a", seed=1)
    create(backend, "b", seed=2)
    train_step(backend, "a", batch(), learning_rate=5e-2)
    train_step(backend, "b", batch(), learning_rate=1e-1)
    expected = {model_id: backend.forward(model_id, batch(), "cross_entropy", None, no_progress).metrics
                for model_id in ("a", "b")}

    def run(model_id: str) -> list[dict[str, float]]:
        return [backend.forward(model_id, batch(), "cross_entropy", None, no_progress).metrics for _ in range(4)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {model_id: pool.submit(run, model_id) for model_id in ("a", "b")}
        results = {model_id: future.result() for model_id, future in futures.items()}

    assert expected["a"] != expected["b"]
    for model_id in ("a", "b"):
        assert results[model_id] == [expected[model_id]] * 4


def test_unembed_adapter_leaves_tied_embeddings_unchanged(backend: TorchBackend):
    create(backend, "m1", train_attn=False, train_mlp=False, train_unembed=True)
    base = backend._models["m1"].base
    embeddings = base.model.get_input_embeddings().weight.clone()

    first = train_step(backend, "m1", batch())
    second = train_step(backend, "m1", batch())

    assert second < first
    assert torch.equal(base.model.get_input_embeddings().weight, embeddings)


def test_unknown_model_not_found(backend: TorchBackend):
    with pytest.raises(NotFoundError):
        backend.forward("missing", batch(), "cross_entropy", None, no_progress)
    with pytest.raises(NotFoundError):
        backend.unload_model("missing")


def test_create_model_rejects_duplicate_and_unknown_base(backend: TorchBackend):
    create(backend, "m1")

    with pytest.raises(ConflictError):
        create(backend, "m1")
    with pytest.raises(NotFoundError, match="Unknown base model"):
        backend.create_model("m2", "no/such-model", LoraSpec(rank=4))
    assert backend.model_info("m1").lora_rank == 4


def test_unload_model_drops_adapter_and_base(backend: TorchBackend):
    create(backend, "a")
    create(backend, "b")

    backend.unload_model("a")
    assert "train_a" not in backend._models["b"].base.peft.peft_config
    with pytest.raises(NotFoundError):
        backend.model_info("a")

    backend.unload_model("b")
    assert backend._bases == {}


# Forward and forward_backward


def test_cross_entropy_matches_manual_log_softmax(backend: TorchBackend, reference_model):
    create(backend, "m1")  # lora_B starts at zero, so the adapter does not change the output yet
    examples = batch()

    result = backend.forward("m1", examples, "cross_entropy", None, no_progress)

    expected_total = 0.0
    for example, output in zip(examples, result.outputs):
        expected = manual_logprobs(reference_model, example.tokens, example.loss_inputs["target_tokens"].tolist())
        assert output["logprobs"].dtype == torch.float32
        assert output["logprobs"].shape == (len(example.tokens),)
        torch.testing.assert_close(output["logprobs"], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(output["elementwise_loss"], -expected, rtol=1e-4, atol=1e-4)
        expected_total += float(-expected.sum())
    assert set(result.metrics) == {"loss:sum"}
    assert result.metrics["loss:sum"] == pytest.approx(expected_total, rel=1e-4)


def test_cross_entropy_honours_weights_including_negative(backend: TorchBackend):
    create(backend, "m1")
    weights = [1.0, 0.0, -2.0, 0.5, 3.0]
    example = make_example([12, 22, 32, 42, 52], [22, 32, 42, 52, 62], weights=weights)

    output = backend.forward("m1", [example], "cross_entropy", None, no_progress)

    logprobs = output.outputs[0]["logprobs"]
    expected = -logprobs * torch.tensor(weights)
    torch.testing.assert_close(output.outputs[0]["elementwise_loss"], expected)
    assert output.outputs[0]["elementwise_loss"][1] == 0
    assert output.metrics["loss:sum"] == pytest.approx(float(expected.sum()), rel=1e-5)


def test_forward_reports_progress_per_micro_batch(backend: TorchBackend):
    create(backend, "m1")
    calls = []

    backend.forward("m1", batch(), "cross_entropy", None, lambda *args, **kwargs: calls.append(args[:3]))

    # Longest first with a maximum of 8 padded tokens: [6 tokens], [5 tokens], [3, 2 tokens].
    assert calls == [("forward", 1, 3), ("forward", 2, 3), ("forward", 3, 3)]


def test_forward_computes_no_gradients(backend: TorchBackend):
    create(backend, "m1")

    backend.forward("m1", batch(), "cross_entropy", None, no_progress)

    assert all(param.grad is None for param in adapter_params(backend, "m1"))


def test_forward_backward_accumulates_gradients(backend: TorchBackend):
    create(backend, "m1")

    backend.forward_backward("m1", batch(), "cross_entropy", None, no_progress)
    once = [param.grad.clone() for param in adapter_params(backend, "m1")]
    backend.forward_backward("m1", batch(), "cross_entropy", None, no_progress)

    for param, gradient in zip(adapter_params(backend, "m1"), once):
        torch.testing.assert_close(param.grad, 2 * gradient)
    assert any(gradient.abs().sum() > 0 for gradient in once)


def test_loss_falls_over_training_rounds(backend: TorchBackend):
    create(backend, "m1")

    losses = [train_step(backend, "m1", batch()) for _ in range(5)]

    assert losses[-1] < 0.8 * losses[0]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


def test_cancelled_forward_backward_leaves_model_unchanged(backend: TorchBackend):
    create(backend, "m1")
    train_step(backend, "m1", batch())
    backend.forward_backward("m1", batch(), "cross_entropy", None, no_progress)
    weights = [param.detach().clone() for param in adapter_params(backend, "m1")]
    gradients = [param.grad.clone() for param in adapter_params(backend, "m1")]

    with pytest.raises(JobCancelledError):
        backend.forward_backward("m1", batch(), "cross_entropy", None, CancelAt("backward", 2))

    for param, weight, gradient in zip(adapter_params(backend, "m1"), weights, gradients):
        assert torch.equal(param, weight)
        assert torch.equal(param.grad, gradient)


def test_cancelled_optim_step_leaves_weights_unchanged(backend: TorchBackend):
    create(backend, "m1")
    backend.forward_backward("m1", batch(), "cross_entropy", None, no_progress)
    weights = [param.detach().clone() for param in adapter_params(backend, "m1")]

    with pytest.raises(JobCancelledError):
        backend.optim_step("m1", AdamParams(learning_rate=1e-2), CancelAt("optimizer step", 0))

    assert all(torch.equal(param, weight) for param, weight in zip(adapter_params(backend, "m1"), weights))
    assert all(param.grad is not None for param in adapter_params(backend, "m1"))


def test_optim_step_clips_and_reports_metrics(backend: TorchBackend):
    create(backend, "m1")
    backend.forward_backward("m1", batch(), "cross_entropy", None, no_progress)

    metrics = backend.optim_step("m1", AdamParams(learning_rate=1e-3, grad_clip_norm=1e-3), no_progress)

    assert metrics["grad_norm:mean"] > 1e-3  # the norm before clipping
    assert metrics["learning_rate:mean"] == 1e-3
    assert all(param.grad is None for param in adapter_params(backend, "m1"))


@pytest.mark.parametrize("field, value", [("learning_rate", -1.0), ("beta1", 1.0), ("eps", float("nan"))])
def test_optim_step_invalid_adam_params_rejected(backend: TorchBackend, field: str, value: float):
    create(backend, "m1")
    with pytest.raises(UserError, match=field):
        backend.optim_step("m1", AdamParams(**{field: value}), no_progress)


@pytest.mark.parametrize("examples, message", [
    ([make_example([1, 2], [2, 3]), make_example([1, 49152], [2, 3])], r"datum 1: model_input\[1\] = 49152"),
    ([make_example([1, 2], [2, -1])], r"datum 0: loss_fn_inputs.target_tokens\[1\] = -1"),
    ([make_example([1, 2, 3], [2, 3])], r"datum 0: target_tokens has shape \(2,\), expected \(3,\)"),
    ([make_example([1, 2], [2, 3], weights=[1.0])], r"datum 0: weights has shape"),
    ([make_example([], [])], "datum 0: model_input is empty"),
    ([], "no examples"),
    ([make_example([1] * 8193, [1] * 8193)], "exceed the model context of 8192"),
    ([make_example([1, 2], [2, 3], advantages=[1.0, 1.0])], "does not take loss_fn_inputs 'advantages'"),
])
def test_invalid_examples_rejected(backend: TorchBackend, examples: list[Example], message: str):
    create(backend, "m1")
    with pytest.raises(UserError, match=message):
        backend.forward_backward("m1", examples, "cross_entropy", None, no_progress)
    assert all(param.grad is None for param in adapter_params(backend, "m1"))


def test_unknown_loss_fn_rejected(backend: TorchBackend):
    create(backend, "m1")
    with pytest.raises(UserError, match="unknown loss_fn 'mse'"):
        backend.forward("m1", batch(), "mse", None, no_progress)
    with pytest.raises(UserError, match="takes no config keys"):
        backend.forward("m1", batch(), "cross_entropy", {"clip_low_threshold": 0.5}, no_progress)


# Policy-gradient losses


def rl_example() -> Example:
    return make_example([10, 20, 30, 40], [20, 30, 40, 50], logprobs=[-10.0, -11.5, -10.2, -9.0],
                        advantages=[1.0, -1.0, 2.0, -0.5])


def test_importance_sampling_matches_formula(backend: TorchBackend):
    create(backend, "m1")
    example = rl_example()

    result = backend.forward("m1", [example], "importance_sampling", None, no_progress)

    logprobs = result.outputs[0]["logprobs"]
    ratio = torch.exp(logprobs - example.loss_inputs["logprobs"])
    expected = -(ratio * example.loss_inputs["advantages"]).sum()
    assert result.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)


def test_ppo_matches_clipped_formula(backend: TorchBackend):
    create(backend, "m1")
    example = rl_example()
    config = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}

    result = backend.forward("m1", [example], "ppo", config, no_progress)

    ratio = torch.exp(result.outputs[0]["logprobs"] - example.loss_inputs["logprobs"])
    advantages = example.loss_inputs["advantages"]
    objective = torch.minimum(ratio * advantages, ratio.clamp(0.9, 1.1) * advantages)
    assert ((ratio < 0.9) | (ratio > 1.1)).any(), "the example must exercise the clipping"
    assert result.metrics["loss:sum"] == pytest.approx(float(-objective.sum()), rel=1e-5)


def test_ppo_trains_and_rejects_bad_thresholds(backend: TorchBackend):
    create(backend, "m1")
    result = backend.forward_backward("m1", [rl_example()], "ppo", None, no_progress)
    assert any(param.grad.abs().sum() > 0 for param in adapter_params(backend, "m1"))
    assert "logprobs" in result.outputs[0]

    with pytest.raises(UserError, match="clip thresholds"):
        backend.forward("m1", [rl_example()], "ppo", {"clip_low_threshold": 1.5}, no_progress)


# Checkpoints


def test_save_load_round_trip_gives_identical_outputs(backend: TorchBackend, tmp_path: Path):
    create(backend, "a")
    train_step(backend, "a", batch())
    train_step(backend, "a", batch())
    backend.save_adapter("a", tmp_path / "ckpt", True, no_progress)

    create(backend, "b")
    backend.load_adapter("b", tmp_path / "ckpt", True, no_progress)

    saved = backend.forward("a", batch(), "cross_entropy", None, no_progress)
    loaded = backend.forward("b", batch(), "cross_entropy", None, no_progress)
    for first, second in zip(saved.outputs, loaded.outputs):
        assert torch.equal(first["logprobs"], second["logprobs"])

    # The optimizer state came along, so one more identical step keeps both models identical.
    train_step(backend, "a", batch())
    train_step(backend, "b", batch())
    for first, second in zip(adapter_params(backend, "a"), adapter_params(backend, "b")):
        assert torch.equal(first, second)


def test_saved_adapter_loads_with_peft(backend: TorchBackend, catalogue: Catalogue, tmp_path: Path):
    from peft import PeftModel

    create(backend, "a")
    train_step(backend, "a", batch())
    backend.save_adapter("a", tmp_path / "ckpt", False, no_progress)

    base = AutoModelForCausalLM.from_pretrained(str(catalogue.resolve(TINY_NAME).model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "ckpt")).eval()
    example = batch()[0]
    expected = backend.forward("a", [example], "cross_entropy", None, no_progress).outputs[0]["logprobs"]
    torch.testing.assert_close(manual_logprobs(model, example.tokens, example.loss_inputs["target_tokens"].tolist()),
                               expected, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "ckpt" / "optimizer.pt").exists()


def test_cancelled_save_keeps_previous_checkpoint(backend: TorchBackend, tmp_path: Path):
    create(backend, "a")
    backend.save_adapter("a", tmp_path / "ckpt", False, no_progress)
    before = (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes()
    train_step(backend, "a", batch())

    with pytest.raises(JobCancelledError):
        backend.save_adapter("a", tmp_path / "ckpt", False, CancelAt("saving", 3))
    with pytest.raises(JobCancelledError):
        backend.save_adapter("a", tmp_path / "other", False, CancelAt("saving", 3))

    assert (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]


def test_load_rejects_incompatible_adapter(backend: TorchBackend, tmp_path: Path):
    create(backend, "a", rank=4)
    create(backend, "b", rank=8)
    create(backend, "c", rank=4, train_mlp=False)
    backend.save_adapter("a", tmp_path / "ckpt", False, no_progress)

    with pytest.raises(UserError, match="rank 4"):
        backend.load_adapter("b", tmp_path / "ckpt", False, no_progress)
    with pytest.raises(UserError, match="targets"):
        backend.load_adapter("c", tmp_path / "ckpt", False, no_progress)
    with pytest.raises(NotFoundError, match="optimizer"):
        backend.load_adapter("a", tmp_path / "ckpt", True, no_progress)
    with pytest.raises(NotFoundError):
        backend.load_adapter("a", tmp_path / "missing", False, no_progress)


# Sampling


def sample(backend: TorchBackend, adapter_dir: Path | None = None, prompt: list[int] = (10, 20, 30),
           num_samples: int = 2, prompt_logprobs: bool = False, topk: int = 0, **params: object):
    return backend.sample(TINY_NAME, adapter_dir, list(prompt), num_samples, SamplingParams(**params),
                          prompt_logprobs, topk, no_progress)


def test_sample_honours_max_tokens(backend: TorchBackend):
    calls = []
    result = backend.sample(TINY_NAME, None, [10, 20, 30], 3, SamplingParams(max_tokens=7, seed=1), False, 0,
                            lambda *args, **kwargs: calls.append(args[:3]))

    assert len(result.sequences) == 3
    for sequence in result.sequences:
        assert len(sequence.tokens) == 7
        assert len(sequence.logprobs) == 7
        assert sequence.stop_reason == "length"
    assert calls == [("sampling", step, 7) for step in range(1, 8)]


def test_sample_stop_token_ends_with_reason_stop(backend: TorchBackend):
    greedy = sample(backend, max_tokens=5, temperature=0.0).sequences[0].tokens
    stop_token = greedy[-1]

    result = sample(backend, max_tokens=5, temperature=0.0, stop_token_ids=[stop_token])

    for sequence in result.sequences:
        assert sequence.tokens == greedy[:greedy.index(stop_token) + 1]
        assert sequence.stop_reason == "stop"


def test_sample_stop_string_ends_with_reason_stop(backend: TorchBackend, catalogue: Catalogue):
    tokenizer = AutoTokenizer.from_pretrained(str(catalogue.resolve(TINY_NAME).tokenizer_dir))
    greedy = sample(backend, num_samples=1, max_tokens=6, temperature=0.0)
    tokens = greedy.sequences[0].tokens
    text = tokenizer.decode(tokens[:3])
    stop = text[len(tokenizer.decode(tokens[:2])):]
    assert stop, "the third greedy token must decode to some text"

    result = sample(backend, num_samples=1, max_tokens=6, temperature=0.0, stop_strings=[stop])

    assert result.sequences[0].stop_reason == "stop"
    assert result.sequences[0].tokens == tokens[:len(result.sequences[0].tokens)]
    assert len(result.sequences[0].tokens) <= 3


def test_sample_same_seed_same_tokens(backend: TorchBackend):
    first = sample(backend, num_samples=3, max_tokens=8, seed=42, temperature=1.0, top_k=50, top_p=0.9)
    second = sample(backend, num_samples=3, max_tokens=8, seed=42, temperature=1.0, top_k=50, top_p=0.9)
    other = sample(backend, num_samples=3, max_tokens=8, seed=43, temperature=1.0, top_k=50, top_p=0.9)

    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]


def test_sample_greedy_is_deterministic(backend: TorchBackend):
    first = sample(backend, num_samples=2, max_tokens=8, seed=1, temperature=0.0)
    second = sample(backend, num_samples=2, max_tokens=8, seed=2, temperature=0.0)

    assert first.sequences[0].tokens == first.sequences[1].tokens == second.sequences[0].tokens


def test_sample_logprobs_match_untempered_forward(backend: TorchBackend):
    create(backend, "m1")
    result = sample(backend, num_samples=1, max_tokens=5, seed=3, temperature=0.7)
    sequence = result.sequences[0]
    full = [10, 20, 30, *sequence.tokens]

    forward = backend.forward("m1", [make_example(full[:-1], full[1:])], "cross_entropy", None, no_progress)

    torch.testing.assert_close(torch.tensor(sequence.logprobs), forward.outputs[0]["logprobs"][2:],
                               rtol=1e-4, atol=1e-4)


def test_sample_prompt_logprobs(backend: TorchBackend, reference_model):
    prompt = [10, 20, 30, 40]

    result = sample(backend, prompt=prompt, max_tokens=1, prompt_logprobs=True, topk=3)

    assert result.prompt_logprobs[0] is None
    expected = manual_logprobs(reference_model, prompt[:-1], prompt[1:])
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), expected, rtol=1e-4, atol=1e-4)
    assert result.topk_prompt_logprobs[0] is None
    assert [len(entry) for entry in result.topk_prompt_logprobs[1:]] == [3, 3, 3]
    best = result.topk_prompt_logprobs[1]
    assert best[0][1] >= best[1][1] >= best[2][1]


def test_sampler_adapter_unaffected_by_further_training(backend: TorchBackend, tmp_path: Path):
    create(backend, "m1")
    for _ in range(3):
        train_step(backend, "m1", batch(), learning_rate=5e-2)
    backend.save_adapter("m1", tmp_path / "sampler", False, no_progress)
    base_only = sample(backend, num_samples=1, max_tokens=6, temperature=0.0)
    before = sample(backend, tmp_path / "sampler", num_samples=1, max_tokens=6, temperature=0.0)

    for _ in range(3):
        train_step(backend, "m1", batch(), learning_rate=5e-2)
    after = sample(backend, tmp_path / "sampler", num_samples=1, max_tokens=6, temperature=0.0)

    assert after.sequences[0].logprobs == before.sequences[0].logprobs
    assert before.sequences[0].logprobs != base_only.sequences[0].logprobs


def test_sampler_cache_evicts_least_recently_used(catalogue: Catalogue, tmp_path: Path):
    backend = TorchBackend(catalogue.resolve, max_loaded_samplers=2)
    create(backend, "m1")
    for name in ("one", "two", "three"):
        train_step(backend, "m1", batch())
        backend.save_adapter("m1", tmp_path / name, False, no_progress)
        sample(backend, tmp_path / name, num_samples=1, max_tokens=1)

    loaded = backend._models["m1"].base.samplers
    assert [Path(folder).name for folder, _ in loaded] == ["two", "three"]


@pytest.mark.parametrize("prompt, params, message", [
    ([10, 49152], {}, "outside the vocabulary"),
    ([], {}, "prompt is empty"),
    ([10], {"max_tokens": 0}, "max_tokens"),
    ([10] * 8190, {"max_tokens": 3}, "exceeds the model context"),
    ([10], {"top_p": 0.0}, "top_p"),
])
def test_sample_invalid_request_rejected(backend: TorchBackend, prompt: list[int], params: dict, message: str):
    with pytest.raises(UserError, match=message):
        sample(backend, prompt=prompt, **params)


def test_sample_invalid_num_samples_rejected(backend: TorchBackend):
    with pytest.raises(UserError, match="num_samples"):
        sample(backend, num_samples=0)
