"""Batched decoding of concurrent sample calls on TorchBackend with the catalogue's tiny random Llama."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from server.engine.backend import LoraSpec, SampleResult, SamplingParams, no_progress
from server.engine.catalogue import TINY_NAME, Catalogue
from server.engine.torch_backend import TorchBackend
from server.errors import JobCancelledError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def backend(catalogue: Catalogue) -> TorchBackend:
    return TorchBackend(catalogue.resolve)


@dataclass
class Call:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter_dir: Path | None = None
    progress: object = no_progress
    extra: dict = field(default_factory=dict)


# Prompts of different lengths, greedy and seeded sampling, different max_tokens, stops and sample counts.
CALLS = [
    Call([10, 20, 30], 1, SamplingParams(max_tokens=8, temperature=0.0)),
    Call(list(range(100, 117)), 2, SamplingParams(max_tokens=5, temperature=1.0, seed=7, top_k=50, top_p=0.9)),
    Call([5], 3, SamplingParams(max_tokens=10, temperature=0.8, seed=11)),
    Call(list(range(300, 340)), 1, SamplingParams(max_tokens=3, temperature=0.0)),
    Call([42, 43, 44, 45], 2, SamplingParams(max_tokens=6, temperature=1.3, seed=3, top_k=5)),
]


def run(backend: TorchBackend, call: Call) -> SampleResult:
    return backend.sample(TINY_NAME, call.adapter_dir, call.prompt, call.num_samples, call.params, False, 0,
                          call.progress)


def record_batch_sizes(backend: TorchBackend) -> list[int]:
    """Record the batch size of every forward call of the base model."""
    sizes: list[int] = []
    model = backend._bases[TINY_NAME].model
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    return sizes


def run_together(backend: TorchBackend, calls: list[Call]) -> list[Future]:
    """Start `calls` while the base is busy, so that they all queue, then free the base."""
    base = backend._bases[TINY_NAME]
    pool = ThreadPoolExecutor(len(calls))
    with base.lock:
        futures = [pool.submit(run, backend, call) for call in calls]
        deadline = time.monotonic() + 30
        while base.sample_queue.waiting_count() < len(calls):
            assert time.monotonic() < deadline, "the sample calls never queued"
            time.sleep(0.01)
    pool.shutdown(wait=True)
    return futures


def assert_same_result(batched: SampleResult, alone: SampleResult) -> None:
    assert len(batched.sequences) == len(alone.sequences)
    for got, expected in zip(batched.sequences, alone.sequences):
        assert got.tokens == expected.tokens
        assert got.stop_reason == expected.stop_reason
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def test_concurrent_calls_decode_in_one_batch(backend: TorchBackend):
    alone = [run(backend, call) for call in CALLS]
    sizes = record_batch_sizes(backend)

    futures = run_together(backend, CALLS)

    # One prefill row per prompt, then one row per sample while its request runs.
    assert sizes[0] == len(CALLS)
    assert sizes[1] == sum(call.num_samples for call in CALLS)
    assert len(sizes) == max(call.params.max_tokens for call in CALLS)
    for future, expected in zip(futures, alone):
        assert_same_result(future.result(), expected)


def test_batched_stop_token_ends_only_its_request(backend: TorchBackend):
    greedy = run(backend, CALLS[0]).sequences[0].tokens
    stop_token = greedy[2]
    stopping = Call(CALLS[0].prompt, 1, SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_token]))
    calls = [stopping, CALLS[1], CALLS[2]]
    alone = [run(backend, call) for call in calls]

    futures = run_together(backend, calls)

    assert alone[0].sequences[0].stop_reason == "stop"
    assert alone[0].sequences[0].tokens == greedy[:greedy.index(stop_token) + 1]
    for future, expected in zip(futures, alone):
        assert_same_result(future.result(), expected)


def test_cancelled_call_leaves_batch_partners_running(backend: TorchBackend):
    alone = [run(backend, call) for call in CALLS[:3]]

    def cancel_at_step_two(phase: str, completed: int, total: int, metrics=None) -> None:
        if completed == 2:
            raise JobCancelledError("cancelled at step 2")

    cancelled = Call(CALLS[2].prompt, 3, CALLS[2].params, progress=cancel_at_step_two)
    futures = run_together(backend, [CALLS[0], CALLS[1], cancelled])

    with pytest.raises(JobCancelledError, match="step 2"):
        futures[2].result()
    assert_same_result(futures[0].result(), alone[0])
    assert_same_result(futures[1].result(), alone[1])


def test_batch_capped_at_max_sequences(catalogue: Catalogue):
    backend = TorchBackend(catalogue.resolve, max_batch_sequences=4)
    calls = [Call([10 + i, 20, 30], 2, SamplingParams(max_tokens=2, temperature=0.0)) for i in range(3)]
    alone = [run(backend, call) for call in calls]
    sizes = record_batch_sizes(backend)

    futures = run_together(backend, calls)

    # Two calls of two samples fill the first batch; the third runs in a second one.
    assert sizes == [2, 4, 1, 2]
    for future, expected in zip(futures, alone):
        assert_same_result(future.result(), expected)


def test_calls_on_different_adapters_not_batched(backend: TorchBackend, tmp_path: Path):
    backend.create_model("m1", TINY_NAME, LoraSpec(rank=4, seed=0))
    with torch.no_grad():
        for param in backend._models["m1"].params:
            param.add_(0.05)
    backend.save_adapter("m1", tmp_path / "sampler", False, no_progress)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    calls = [Call([10, 20, 30], 1, params), Call([10, 20, 30], 1, params, adapter_dir=tmp_path / "sampler"),
             Call([11, 20, 30], 1, params, adapter_dir=tmp_path / "sampler")]
    alone = [run(backend, call) for call in calls]
    sizes = record_batch_sizes(backend)

    futures = run_together(backend, calls)

    assert sorted(sizes) == sorted([1, 1, 1, 1, 2, 2, 2, 2])
    assert alone[0].sequences[0].tokens != alone[1].sequences[0].tokens
    for future, expected in zip(futures, alone):
        assert_same_result(future.result(), expected)


def test_prompt_logprobs_call_runs_alone(backend: TorchBackend):
    run(backend, CALLS[0])
    sizes = record_batch_sizes(backend)
    base = backend._bases[TINY_NAME]
    pool = ThreadPoolExecutor(2)

    with base.lock:
        plain = pool.submit(run, backend, CALLS[0])
        with_logprobs = pool.submit(backend.sample, TINY_NAME, None, CALLS[0].prompt, 1, CALLS[0].params, True, 0,
                                    no_progress)
        while base.sample_queue.waiting_count() < 1:
            time.sleep(0.01)
    pool.shutdown(wait=True)

    assert with_logprobs.result().prompt_logprobs is not None
    assert plain.result().prompt_logprobs is None
    assert max(sizes) == 1
    assert len(sizes) == 2 * CALLS[0].params.max_tokens


def test_short_call_returns_before_batch_ends(backend: TorchBackend):
    run(backend, CALLS[0])
    short_returned = threading.Event()
    seen_at_step_three: list[bool] = []

    def wait_for_short_call(phase: str, completed: int, total: int, metrics=None) -> None:
        if completed == 3:
            seen_at_step_three.append(short_returned.wait(timeout=10))

    def run_short() -> SampleResult:
        result = run(backend, Call([10, 20, 30], 1, SamplingParams(max_tokens=1, temperature=0.0)))
        short_returned.set()
        return result

    base = backend._bases[TINY_NAME]
    pool = ThreadPoolExecutor(2)
    with base.lock:
        long_call = pool.submit(run, backend, Call([7, 8, 9], 1, SamplingParams(max_tokens=5, temperature=0.0),
                                                   progress=wait_for_short_call))
        short_call = pool.submit(run_short)
        while base.sample_queue.waiting_count() < 2:
            time.sleep(0.01)
    pool.shutdown(wait=True)

    assert len(short_call.result().sequences[0].tokens) == 1
    assert len(long_call.result().sequences[0].tokens) == 5
    assert seen_at_step_three == [True]
