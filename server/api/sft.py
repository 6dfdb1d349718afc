"""Server-side multi-step training jobs (POST /api/v1/jobs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import jsonify

from ..engine.backend import AdamParams
from ..services.sft import MAX_SFT_BATCH_SIZE, MAX_SFT_STEPS, SftConfig
from . import presenters
from .schemas import Int64, Seconds

_DEFAULT_ADAM = AdamParams()


class _StrictModel(BaseModel):
    # Unknown fields are rejected, because a misspelled option would otherwise train with a default.
    # NaN and infinity are rejected, because they would poison the weights.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class DatasetSource(_StrictModel):
    inline: list[Any] | None = None  # rows as JSON objects
    path: str | None = None  # JSONL file relative to the server's data folder


class SftAdam(_StrictModel):
    beta1: float = Field(_DEFAULT_ADAM.beta1, ge=0, lt=1)
    beta2: float = Field(_DEFAULT_ADAM.beta2, ge=0, lt=1)
    eps: float = Field(_DEFAULT_ADAM.eps, gt=0)  # the update divides by sqrt(v) + eps
    weight_decay: float = Field(_DEFAULT_ADAM.weight_decay, ge=0)
    grad_clip_norm: float = Field(_DEFAULT_ADAM.grad_clip_norm, ge=0)  # 0 = no clipping


class SftJobRequest(_StrictModel):
    kind: Literal["sft"]
    model_id: str = Field(min_length=1)
    dataset: DatasetSource
    steps: int | None = Field(None, ge=1, le=MAX_SFT_STEPS)
    epochs: int | None = Field(None, ge=1, le=MAX_SFT_STEPS)  # the service also bounds the steps they make to MAX_SFT_STEPS
    batch_size: int = Field(8, ge=1, le=MAX_SFT_BATCH_SIZE)
    learning_rate: float = Field(1e-4, ge=0, le=1e3)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_SFT_STEPS)
    save_every: int = Field(0, ge=0, le=MAX_SFT_STEPS)
    save_on_cancel: bool = False
    seed: Int64 = 0
    max_length: int | None = Field(None, ge=2)
    adam: SftAdam = Field(default_factory=SftAdam)
    timeout_s: Seconds | None = None


async def submit_job(services, body: SftJobRequest):
    adam = body.adam
    config = SftConfig(
        model_id=body.model_id, inline_rows=body.dataset.inline, dataset_path=body.dataset.path,
        steps=body.steps, epochs=body.epochs, batch_size=body.batch_size, learning_rate=body.learning_rate,
        lr_schedule=body.lr_schedule, warmup_steps=body.warmup_steps, save_every=body.save_every,
        save_on_cancel=body.save_on_cancel, seed=body.seed, max_length=body.max_length,
        adam=AdamParams(beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps, weight_decay=adam.weight_decay,
                        grad_clip_norm=adam.grad_clip_norm),
        timeout_s=body.timeout_s)
    job = await services.sft.submit(config)

    response = jsonify({"request_id": job.id, "job": presenters.job_record(job, services.jobs.queue_position(job))})
    response.status_code = 202
    return response
