"""Request bodies of the Tinker routes, as pydantic models.

They mirror the wire shapes that the tinker SDK sends. Unknown fields are ignored so newer SDKs
that add fields keep working; a wrong type or value comes back as a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Integers reach torch and SQLite, which hold at most 64 bits; a larger value is a 400, not a crash.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
SeqId = Annotated[int, Field(ge=0, le=2**53)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]  # at most a week
MAX_METADATA_BYTES = 64 * 1024


class WireModel(BaseModel):
    # NaN and infinity are rejected: they would poison weights and cannot be written as JSON.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)


def _check_metadata_size(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    if metadata is not None:
        size = len(json.dumps(metadata))
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"user_metadata is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}")
    return metadata


Metadata = Annotated[dict[str, Any] | None, AfterValidator(_check_metadata_size)]


class EmptyRequest(WireModel):
    pass


class ClientConfigRequest(WireModel):
    sdk_version: str | None = None


class CreateSessionRequest(WireModel):
    tags: list[str] = Field(default_factory=list)
    user_metadata: Metadata = None
    sdk_version: str | None = None
    project_id: str | None = None


class SessionRequest(WireModel):
    session_id: str


class LoraConfig(WireModel):
    rank: int = Field(ge=1, le=1024)
    seed: Int64 | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModelRequest(WireModel):
    session_id: str
    model_seq_id: Int64 | None = None
    base_model: str = Field(min_length=1)
    user_metadata: Metadata = None
    lora_config: LoraConfig | None = None


class WeightsInfoRequest(WireModel):
    tinker_path: str = Field(min_length=1)


class ModelRequest(WireModel):
    model_id: str


class TensorData(WireModel):
    data: list[Int64] | list[float]
    dtype: Literal["int64", "float32"]
    shape: list[Annotated[int, Field(ge=0, le=2**31)]] | None = None
    sparse_crow_indices: list[Int64] | None = None
    sparse_col_indices: list[Int64] | None = None

    @model_validator(mode="after")
    def _check_sparse(self) -> "TensorData":
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise ValueError("sparse_crow_indices and sparse_col_indices must be given together")
        if self.sparse_crow_indices is not None and self.shape is None:
            raise ValueError("shape is required for a sparse tensor")
        return self


class EncodedTextChunk(WireModel):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[TokenId]


class ImageChunk(WireModel):
    type: Literal["image", "image_asset_pointer"]


class ModelInput(WireModel):
    chunks: list[Union[EncodedTextChunk, ImageChunk]] = Field(min_length=1)

    def tokens(self) -> list[int]:
        result: list[int] = []
        for index, chunk in enumerate(self.chunks):
            if not isinstance(chunk, EncodedTextChunk):
                from ..errors import UserError
                raise UserError(f"chunks[{index}] is an image chunk; this server serves text-only models",
                                field=f"chunks[{index}].type")
            result.extend(chunk.tokens)
        return result


class Datum(WireModel):
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)


LossFn = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]


class ForwardBackwardInput(WireModel):
    data: list[Datum] = Field(min_length=1)
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, float] | None = None


class ForwardBackwardRequest(WireModel):
    forward_backward_input: ForwardBackwardInput
    model_id: str
    seq_id: SeqId | None = None
    timeout_s: Seconds | None = None


class ForwardRequest(WireModel):
    forward_input: ForwardBackwardInput
    model_id: str
    seq_id: SeqId | None = None
    timeout_s: Seconds | None = None


class AdamParams(WireModel):
    learning_rate: float = Field(default=1e-4, ge=0, le=1e3)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-12, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip_norm: float = Field(default=0.0, ge=0)


class OptimStepRequest(WireModel):
    adam_params: AdamParams
    model_id: str
    seq_id: SeqId | None = None
    timeout_s: Seconds | None = None


class SaveWeightsRequest(WireModel):
    model_id: str
    path: str | None = None
    seq_id: SeqId | None = None
    ttl_seconds: Int64 | None = None
    overwrite: bool = False


class SaveWeightsForSamplerRequest(WireModel):
    model_id: str
    path: str | None = None
    sampling_session_seq_id: Int64 | None = None
    seq_id: SeqId | None = None
    ttl_seconds: Int64 | None = None


class LoadWeightsRequest(WireModel):
    model_id: str
    path: str = Field(min_length=1)
    optimizer: bool = False
    seq_id: SeqId | None = None


class CreateSamplingSessionRequest(WireModel):
    session_id: str
    sampling_session_seq_id: Int64 | None = None
    base_model: str | None = None
    model_path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "CreateSamplingSessionRequest":
        if not self.base_model and not self.model_path:
            raise ValueError("give base_model or model_path")
        return self


class SamplingParams(WireModel):
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    seed: Int64 | None = None
    stop: Union[str, list[str], list[TokenId], None] = None
    temperature: float = Field(default=1.0, ge=0)
    top_k: int = Field(default=-1, ge=-1, le=2**31 - 1)
    top_p: float = Field(default=1.0, gt=0, le=1)


class SampleRequest(WireModel):
    num_samples: int = Field(default=1, ge=1, le=256)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = Field(default=0, ge=0, le=100)
    timeout_s: Seconds | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "SampleRequest":
        if not (self.sampling_session_id or self.model_path or self.base_model):
            raise ValueError("give sampling_session_id, model_path or base_model")
        return self


class RetrieveFutureRequest(WireModel):
    request_id: str
    allow_metadata_only: bool = False


class CancelFutureRequest(WireModel):
    request_id: str


class TelemetryRequest(WireModel):
    model_config = ConfigDict(extra="allow")
