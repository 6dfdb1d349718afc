"""Autoregressive decoding with a KV cache.

`generate` decodes all samples of one request in one batch. `generate_batch` decodes several
requests on one model together, each with its own prompt, sampling parameters and generator,
so that each request gets the tokens it would get alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.backend import ProgressCallback, SampledSequence, SampleResult, SamplingParams
from server.errors import UserError

MAX_NUM_SAMPLES = 128


def validate_request(prompt: list[int], num_samples: int, params: SamplingParams, topk_prompt_logprobs: int,
                     vocab_size: int, max_context: int) -> None:
    if not prompt:
        raise UserError("the prompt is empty: pass at least one token", field="prompt")
    tokens = torch.as_tensor(prompt)
    out_of_range = (tokens < 0) | (tokens >= vocab_size)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0, 0])
        raise UserError(f"prompt token {position} = {prompt[position]} is outside the vocabulary [0, {vocab_size})",
                        field="prompt")
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise UserError(f"invalid num_samples {num_samples}: expected 1 to {MAX_NUM_SAMPLES}", field="num_samples")
    if params.max_tokens < 1:
        raise UserError(f"invalid max_tokens {params.max_tokens}: expected at least 1", field="max_tokens")
    if len(prompt) + params.max_tokens > max_context:
        raise UserError(f"prompt of {len(prompt)} tokens plus max_tokens {params.max_tokens} exceeds the model "
                        f"context of {max_context}; shorten the prompt or lower max_tokens", field="max_tokens")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise UserError(f"invalid temperature {params.temperature}: expected 0 (greedy) or more",
                        field="temperature")
    if not 0.0 < params.top_p <= 1.0:
        raise UserError(f"invalid top_p {params.top_p}: expected a value in (0, 1]", field="top_p")
    for token in params.stop_token_ids:
        if not 0 <= token < vocab_size:
            raise UserError(f"stop token {token} is outside the vocabulary [0, {vocab_size})", field="stop")
    if any(not text for text in params.stop_strings):
        raise UserError("stop strings must not be empty", field="stop")
    if not 0 <= topk_prompt_logprobs <= vocab_size:
        raise UserError(f"invalid topk_prompt_logprobs {topk_prompt_logprobs}: expected 0 to {vocab_size}",
                        field="topk_prompt_logprobs")


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: list[int], num_samples: int, params: SamplingParams,
             want_prompt_logprobs: bool, topk_prompt_logprobs: int, decode: Callable[[list[int]], str] | None,
             progress: ProgressCallback) -> SampleResult:
    """Sample `num_samples` continuations of `prompt`.

    The returned logprobs of sampled and prompt tokens come from the model's own distribution
    (temperature 1, before top-k and top-p), so that they match the logprobs that `forward`
    computes for the same tokens. Temperature, top-k and top-p shape only the choice of token.
    """
    generator = _generator(params.seed)

    prefill = model(input_ids=torch.tensor([prompt]), use_cache=True)
    prompt_logprobs, topk = _prompt_logprobs(prefill.logits[0].float(), prompt, topk_prompt_logprobs)
    cache = prefill.past_key_values
    cache.batch_repeat_interleave(num_samples)
    next_logits = prefill.logits[:, -1, :].float().expand(num_samples, -1)

    sequences = [_Sequence() for _ in range(num_samples)]
    stop_ids = set(params.stop_token_ids)
    for step in range(params.max_tokens):
        tokens, logprobs = _choose_tokens(next_logits, params, generator)
        for sequence, token, logprob in zip(sequences, tokens.tolist(), logprobs.tolist()):
            if sequence.stop_reason is None:
                sequence.append(token, logprob, stop_ids, params.stop_strings, decode)
        progress("sampling", step + 1, params.max_tokens)
        if all(sequence.stop_reason is not None for sequence in sequences) or step + 1 == params.max_tokens:
            break
        # Finished sequences keep decoding in the batch, and their extra tokens are dropped.
        output = model(input_ids=tokens.unsqueeze(1), past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        next_logits = output.logits[:, -1, :].float()

    return SampleResult(
        sequences=[SampledSequence(s.tokens, s.logprobs, s.stop_reason or "length") for s in sequences],
        prompt_logprobs=prompt_logprobs if want_prompt_logprobs else None,
        topk_prompt_logprobs=topk,
    )


@dataclass(eq=False)
class SampleRequest:
    """One sample call without prompt logprobs, waiting for a batch or decoding in one.

    `adapter_key` is the resolved folder of the sampler adapter, or None for the base model
    alone. Only requests with the same key can share a batch.
    """

    prompt: list[int]
    num_samples: int
    params: SamplingParams
    decode: Callable[[list[int]], str] | None
    progress: ProgressCallback
    adapter_key: str | None
    result: SampleResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, result: SampleResult | None = None, error: BaseException | None = None) -> None:
        self.result = result
        self.error = error
        self.done.set()

    def outcome(self) -> SampleResult:
        """Return the result, or raise the error that ended this request."""
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class SampleQueue:
    """Sample requests on one base model that wait for their turn on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[SampleRequest] = []

    def put(self, request: SampleRequest) -> None:
        with self._lock:
            self._waiting.append(request)

    def waiting_count(self) -> int:
        with self._lock:
            return len(self._waiting)

    def take_batch(self, first: SampleRequest, max_sequences: int) -> list[SampleRequest]:
        """Remove `first` and, oldest first, the waiting requests that may join its batch.

        Returns an empty list when another thread has already taken `first`. A request whose
        `num_samples` alone exceeds `max_sequences` still gets a batch of its own.
        """
        with self._lock:
            if first not in self._waiting:
                return []
            batch = [first]
            sequences = first.num_samples
            for request in self._waiting:
                fits = sequences + request.num_samples <= max_sequences
                if request is not first and request.adapter_key == first.adapter_key and fits:
                    batch.append(request)
                    sequences += request.num_samples
            self._waiting = [request for request in self._waiting if request not in batch]
        return batch


@torch.no_grad()
def generate_batch(model: torch.nn.Module, requests: list[SampleRequest]) -> None:
    """Decode `requests` in one batch, and finish each one with its result or its own error.

    Prompts are left-padded to one length, and the attention mask and position ids keep the
    padding out of every row's computation, so each row gets the logits it would get alone, up
    to float rounding. Each request finishes at the step that ends its last sequence, and its
    rows then leave the batch. An error raised while choosing one request's tokens, such as a
    cancel from its progress callback, ends that request only. An error of the model call
    propagates, and the caller must then finish the requests still running.

    NOTE: a request that arrives while a batch decodes waits for the whole batch, because new
    rows never join a running batch.
    """
    input_ids, attention_mask, position_ids = _left_pad([request.prompt for request in requests])
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    # Each prompt is computed once, and its cache rows are repeated for its samples.
    rows = torch.repeat_interleave(torch.arange(len(requests)),
                                   torch.tensor([request.num_samples for request in requests]))
    cache = prefill.past_key_values
    cache.batch_select_indices(rows)
    attention_mask = attention_mask[rows]
    positions = position_ids[rows, -1] + 1
    next_logits = prefill.logits[rows, -1, :].float()

    running = [_Decoding(request) for request in requests]
    while running:
        still_running, tokens, kept_rows = _decode_step(running, next_logits)
        if not still_running:
            break
        if len(still_running) < len(running):
            kept = torch.tensor(kept_rows)
            cache.batch_select_indices(kept)
            attention_mask = attention_mask[kept]
            positions = positions[kept]
        running = still_running

        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(tokens), 1)], dim=1)
        output = model(input_ids=torch.tensor(tokens).unsqueeze(1), attention_mask=attention_mask,
                       position_ids=positions.unsqueeze(1), past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        positions = positions + 1
        next_logits = output.logits[:, -1, :].float()


def _decode_step(running: list[_Decoding],
                 logits: torch.Tensor) -> tuple[list[_Decoding], list[int], list[int]]:
    """Choose every running request's next tokens from its rows of `logits`.

    Returns the requests still running, their chosen tokens and the rows they occupy in `logits`.
    """
    still_running: list[_Decoding] = []
    tokens: list[int] = []
    kept_rows: list[int] = []
    start = 0
    for decoding in running:
        rows = range(start, start + decoding.request.num_samples)
        start = rows.stop
        try:
            chosen = decoding.step(logits[rows.start:rows.stop])
        except Exception as error:
            decoding.request.finish(error=error)
            continue
        if decoding.finished:
            decoding.request.finish(result=decoding.result())
            continue
        still_running.append(decoding)
        tokens.extend(chosen)
        kept_rows.extend(rows)
    return still_running, tokens, kept_rows


class _Decoding:
    """The decoding state of one request in a batch."""

    def __init__(self, request: SampleRequest) -> None:
        self.request = request
        self.generator = _generator(request.params.seed)
        self.sequences = [_Sequence() for _ in range(request.num_samples)]
        self.stop_ids = set(request.params.stop_token_ids)
        self.steps = 0

    @property
    def finished(self) -> bool:
        return self.steps == self.request.params.max_tokens or all(s.stop_reason is not None for s in self.sequences)

    def step(self, logits: torch.Tensor) -> list[int]:
        params = self.request.params
        tokens, logprobs = _choose_tokens(logits, params, self.generator)
        tokens_list = tokens.tolist()
        for sequence, token, logprob in zip(self.sequences, tokens_list, logprobs.tolist()):
            if sequence.stop_reason is None:
                sequence.append(token, logprob, self.stop_ids, params.stop_strings, self.request.decode)
        self.steps += 1
        self.request.progress("sampling", self.steps, params.max_tokens)
        # Finished sequences of a running request keep decoding, as in `generate`, and their extra tokens are dropped.
        return tokens_list

    def result(self) -> SampleResult:
        return SampleResult(sequences=[SampledSequence(s.tokens, s.logprobs, s.stop_reason or "length")
                                       for s in self.sequences])


def _left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return input ids, attention mask and position ids of `prompts` padded on the left to one length."""
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.zeros(len(prompts), length, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt):] = 1
    # Padding gets position 0; the mask hides it, and each prompt starts at position 0 as it would alone.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class _Sequence:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop_reason: str | None = None

    def append(self, token: int, logprob: float, stop_ids: set[int], stop_strings: list[str],
               decode: Callable[[list[int]], str] | None) -> None:
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in stop_ids:
            self.stop_reason = "stop"
        elif stop_strings and decode is not None:
            # The text before this token held no stop string, so any match now ends at this token.
            text = decode(self.tokens)
            if any(stop in text for stop in stop_strings):
                self.stop_reason = "stop"


def _choose_tokens(logits: torch.Tensor, params: SamplingParams,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        scores = _filter_top_k(logits / params.temperature, params.top_k)
        scores = _filter_top_p(scores, params.top_p)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _filter_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= scores.shape[-1]:
        return scores
    kth_best = torch.topk(scores, top_k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth_best, float("-inf"))


def _filter_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
    # Drop a token once the tokens ranked above it already reach top_p, so the best token always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int],
                     k: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None] | None]:
    """Logprob of each prompt token given the tokens before it; the first token has no prediction."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(prompt[1:]).unsqueeze(1)
    chosen = logprobs.gather(1, targets).squeeze(1).tolist() if len(prompt) > 1 else []
    values: list[float | None] = [None, *chosen]
    if k == 0:
        return values, None
    best = torch.topk(logprobs, k, dim=-1)
    topk: list[list[tuple[int, float]] | None] = [None]
    for ids, scores in zip(best.indices.tolist(), best.values.tolist()):
        topk.append(list(zip(ids, scores)))
    return values, topk
