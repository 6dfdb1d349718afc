"""Autoregressive decoding with a KV cache, all samples of one request in one batch."""

from __future__ import annotations

import math
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
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)

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
