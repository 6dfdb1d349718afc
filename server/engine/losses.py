"""Input checks and loss functions for forward and forward_backward.

Every loss takes padded (batch, length) tensors. `logprobs` is the model's log-probability of
`target_tokens[t]` at position t (no shift), and `mask` is 1 on real tokens and 0 on padding.
Losses are sums over examples and positions, never means, matching Tinker's `loss:sum` metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from server.engine.backend import Example
from server.errors import UserError

@dataclass(frozen=True)
class LossSpec:
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...]
    config_defaults: dict[str, float]


LOSSES = {
    "cross_entropy": LossSpec(("target_tokens",), ("weights",), {}),
    "importance_sampling": LossSpec(("target_tokens", "logprobs", "advantages"), (), {}),
    # The thresholds bound the ratio p_theta / q itself, not its distance from 1.
    "ppo": LossSpec(("target_tokens", "logprobs", "advantages"), (),
                    {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
}


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, the sum over the micro-batch
    elementwise: torch.Tensor | None  # (batch, length) and zero on padding, or None without a per-token form


def resolve_config(loss_fn: str, config: dict[str, float] | None) -> dict[str, float]:
    """Return the loss config with defaults filled in, rejecting unknown losses and keys."""
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise UserError(f"unknown loss_fn {loss_fn!r}: expected one of {sorted(LOSSES)}", field="loss_fn")

    config = dict(config or {})
    unknown = sorted(set(config) - set(spec.config_defaults))
    if unknown:
        raise UserError(f"loss_fn {loss_fn!r} takes no config keys {unknown}; "
                        f"accepted keys: {sorted(spec.config_defaults)}", field="loss_fn_config")
    resolved = {**spec.config_defaults, **{key: float(value) for key, value in config.items()}}

    if loss_fn == "ppo":
        low, high = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
        if not 0.0 <= low <= 1.0 <= high or not math.isfinite(high):
            raise UserError(f"invalid PPO clip thresholds low={low}, high={high}: "
                            "expected 0 <= clip_low_threshold <= 1 <= clip_high_threshold",
                            field="loss_fn_config")
    return resolved


def validate_examples(examples: list[Example], loss_fn: str, vocab_size: int, max_context: int) -> None:
    """Raise UserError naming the datum index and field of the first invalid value."""
    if not examples:
        raise UserError("no examples given: pass at least one datum", field="data")
    spec = LOSSES[loss_fn]
    allowed = set(spec.required_inputs) | set(spec.optional_inputs)

    for index, example in enumerate(examples):
        length = len(example.tokens)
        if length == 0:
            raise UserError(f"datum {index}: model_input is empty", field=f"data[{index}].model_input")
        if length > max_context:
            raise UserError(f"datum {index}: {length} tokens exceed the model context of {max_context}",
                            field=f"data[{index}].model_input")
        _check_token_ids(torch.as_tensor(example.tokens), vocab_size, index, "model_input")

        missing = [name for name in spec.required_inputs if name not in example.loss_inputs]
        if missing:
            raise UserError(f"datum {index}: loss_fn {loss_fn!r} requires loss_fn_inputs {missing}",
                            field=f"data[{index}].loss_fn_inputs.{missing[0]}")
        for name, tensor in example.loss_inputs.items():
            if name not in allowed:
                raise UserError(f"datum {index}: loss_fn {loss_fn!r} does not take loss_fn_inputs {name!r}; "
                                f"accepted: {sorted(allowed)}", field=f"data[{index}].loss_fn_inputs.{name}")
            _check_input_tensor(torch.as_tensor(tensor), name, length, vocab_size, index)


def _check_input_tensor(tensor: torch.Tensor, name: str, length: int, vocab_size: int, index: int) -> None:
    field = f"data[{index}].loss_fn_inputs.{name}"
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise UserError(f"datum {index}: {name} has shape {tuple(tensor.shape)}, expected ({length},) "
                        "like model_input", field=field)
    if name == "target_tokens":
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise UserError(f"datum {index}: target_tokens must be integers, got {tensor.dtype}", field=field)
        _check_token_ids(tensor, vocab_size, index, "loss_fn_inputs.target_tokens")
    elif not torch.isfinite(tensor.double()).all():
        raise UserError(f"datum {index}: {name} contains NaN or infinite values", field=field)


def _check_token_ids(tokens: torch.Tensor, vocab_size: int, index: int, name: str) -> None:
    out_of_range = (tokens < 0) | (tokens >= vocab_size)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0, 0])
        raise UserError(f"datum {index}: {name}[{position}] = {int(tokens[position])} is outside the "
                        f"vocabulary [0, {vocab_size})", field=f"data[{index}].{name}")


def compute_loss(loss_fn: str, logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                 config: dict[str, float]) -> LossOutput:
    if loss_fn == "cross_entropy":
        weights = inputs.get("weights", torch.ones_like(logprobs)) * mask
        elementwise = -logprobs * weights
        return LossOutput(elementwise.sum(), elementwise)
    if loss_fn == "importance_sampling":
        ratio = torch.exp(logprobs - inputs["logprobs"])
        elementwise = -ratio * inputs["advantages"] * mask
        return LossOutput(elementwise.sum(), elementwise)
    return LossOutput(_ppo_loss(logprobs, inputs, mask, config), None)


def _ppo_loss(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
              config: dict[str, float]) -> torch.Tensor:
    """Sum of -min(ratio * A, clip(ratio, low, high) * A) over tokens, computed by verl's vanilla PPO loss.

    verl (0.9.1) differs from that formula in two places: it clamps log(ratio) to [-20, 20], and it
    bounds the loss of negative advantages by `clip_ratio_c` (dual-clip PPO), which is set so high
    here that it never applies.
    """
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    low, high = config["clip_low_threshold"], config["clip_high_threshold"]
    loss, _ = compute_policy_loss_vanilla(
        old_log_prob=inputs["logprobs"], log_prob=logprobs, advantages=inputs["advantages"],
        response_mask=mask, loss_agg_mode="token-sum", config=_verl_actor_config(1.0 - low, high - 1.0))
    return loss


@lru_cache(maxsize=32)
def _verl_actor_config(clip_ratio_low: float, clip_ratio_high: float):
    # Imported here because verl takes seconds to import and only the PPO loss needs it.
    from verl.workers.config.actor import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode="token-sum",
                       clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=1e30)
