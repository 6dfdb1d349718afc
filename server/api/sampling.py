"""Sampling routes: create_sampling_session, samplers/{id}, asample."""

from __future__ import annotations

from ..engine.backend import SamplingParams
from . import presenters

DEFAULT_MAX_TOKENS = 64


async def create_sampling_session(services, body) -> dict:
    sampler = services.sampling.create_session(body.session_id, body.base_model, body.model_path)
    return {"type": "create_sampling_session", "sampling_session_id": sampler.id}


async def get_sampler(services, body, sampler_id: str) -> dict:
    return services.sampling.get(sampler_id).to_dict()


async def sample(services, body):
    wire = body.sampling_params
    if isinstance(wire.stop, list):
        stop = wire.stop
    elif wire.stop:
        stop = [wire.stop]
    else:
        stop = []
    params = SamplingParams(
        max_tokens=wire.max_tokens or DEFAULT_MAX_TOKENS, temperature=wire.temperature, top_p=wire.top_p,
        top_k=wire.top_k, seed=wire.seed,
        stop_strings=[item for item in stop if isinstance(item, str)],
        stop_token_ids=[item for item in stop if isinstance(item, int)])
    return services.sampling.sample(
        sampler_id=body.sampling_session_id, base_model=body.base_model, model_path=body.model_path,
        prompt=body.prompt.tokens(), num_samples=body.num_samples, params=params,
        prompt_logprobs=bool(body.prompt_logprobs), topk_prompt_logprobs=body.topk_prompt_logprobs,
        present=presenters.sample_result, timeout_s=body.timeout_s)
