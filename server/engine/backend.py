"""The contract between the job engine and a model backend.

Every method here is blocking and runs in a worker thread, never on the event loop. Long
methods call `progress(phase, completed, total)` at each micro-batch, token or tensor boundary;
that call raises `JobCancelledError` once the job was cancelled or passed its deadline, and the
backend must then leave the model exactly as before the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch


class ProgressCallback(Protocol):
    def __call__(self, phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None: ...


def no_progress(phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None:
    """Progress callback for callers that do not track progress."""


@dataclass
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass
class Example:
    """One training datum: input tokens and the loss inputs, as dense 1-D tensors of len(tokens)."""

    tokens: list[int]
    loss_inputs: dict[str, torch.Tensor]


@dataclass
class ForwardResult:
    """Per-example outputs (for example `logprobs`, `elementwise_loss`) and `name:reduction` metrics."""

    outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


@dataclass
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str  # "length" or "stop"


@dataclass
class SampleResult:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class ModelInfo:
    model_id: str
    base_model: str
    lora_rank: int
    tokenizer_dir: Path
    vocab_size: int
    max_context: int


class Backend(Protocol):
    def create_model(self, model_id: str, base_model: str, lora: LoraSpec) -> ModelInfo: ...

    def unload_model(self, model_id: str) -> None: ...

    def model_info(self, model_id: str) -> ModelInfo: ...

    def forward(self, model_id: str, examples: list[Example], loss_fn: str,
                loss_fn_config: dict[str, float] | None, progress: ProgressCallback) -> ForwardResult: ...

    def forward_backward(self, model_id: str, examples: list[Example], loss_fn: str,
                         loss_fn_config: dict[str, float] | None, progress: ProgressCallback) -> ForwardResult: ...

    def optim_step(self, model_id: str, params: AdamParams, progress: ProgressCallback) -> dict[str, float]: ...

    def save_adapter(self, model_id: str, directory: Path, with_optimizer: bool, progress: ProgressCallback) -> None: ...

    def load_adapter(self, model_id: str, directory: Path, with_optimizer: bool, progress: ProgressCallback) -> None: ...

    def sample(self, base_model: str, adapter_dir: Path | None, prompt: list[int], num_samples: int,
               params: SamplingParams, prompt_logprobs: bool, topk_prompt_logprobs: int,
               progress: ProgressCallback) -> SampleResult: ...
