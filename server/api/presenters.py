"""Shape service and backend results into the JSON that the tinker SDK deserializes."""

from __future__ import annotations

from typing import Any

import torch

from ..engine.backend import ForwardResult, SampleResult
from ..jobs.record import Job
from ..jobs.states import JobState


def tensor_data(tensor: torch.Tensor) -> dict[str, Any]:
    dtype = "float32" if tensor.is_floating_point() else "int64"
    return {"data": tensor.detach().flatten().tolist(), "dtype": dtype, "shape": list(tensor.shape)}


def forward_result(result: ForwardResult) -> dict[str, Any]:
    return {
        "loss_fn_output_type": "TorchLossReturn",
        "loss_fn_outputs": [{name: tensor_data(value) for name, value in output.items()} for output in result.outputs],
        "metrics": {name: float(value) for name, value in result.metrics.items()},
    }


def optim_step_result(metrics: dict[str, float]) -> dict[str, Any]:
    return {"metrics": {name: float(value) for name, value in metrics.items()}}


def sample_result(result: SampleResult) -> dict[str, Any]:
    return {
        "type": "sample",
        "sequences": [{"tokens": list(seq.tokens), "logprobs": list(seq.logprobs), "stop_reason": seq.stop_reason}
                      for seq in result.sequences],
        "prompt_logprobs": result.prompt_logprobs,
        "topk_prompt_logprobs": ([None if row is None else [list(pair) for pair in row]
                                  for row in result.topk_prompt_logprobs]
                                 if result.topk_prompt_logprobs is not None else None),
    }


def created_model(model) -> dict[str, Any]:
    return {"type": "create_model", "model_id": model.model_id}


def model_info(model) -> dict[str, Any]:
    return {
        "type": "get_info",
        "model_id": model.model_id,
        "model_name": model.base_model,
        "is_lora": True,
        "lora_rank": model.lora.rank,
        "model_data": {"arch": "llama", "model_name": model.base_model,
                       "tokenizer_id": str(model.info.tokenizer_dir)},
    }


def unloaded_model(model_id: str) -> dict[str, Any]:
    return {"type": "unload_model", "model_id": model_id}


def saved_weights(uri: str) -> dict[str, Any]:
    return {"type": "save_weights", "path": uri}


def saved_sampler_weights(answer: dict[str, Any]) -> dict[str, Any]:
    return {"type": "save_weights_for_sampler", **answer}


def loaded_weights(uri: str) -> dict[str, Any]:
    return {"type": "load_weights", "path": uri}


def future_outcome(job: Job) -> tuple[dict[str, Any], int]:
    """Build the retrieve_future response for a job: its result, its error, or try-again (408) while unfinished."""
    if job.state is JobState.SUCCEEDED:
        return job.result, 200
    if job.is_terminal:
        error = job.error or {"message": f"job ended {job.state.value}", "category": "unknown"}
        return {"error": error["message"], "category": error["category"], "state": job.state.value}, 200
    reason = f"job is {job.state.value}, phase {job.phase}"
    if job.progress.total:
        reason += f", {job.progress.completed}/{job.progress.total}"
    return {"type": "try_again", "request_id": job.id, "queue_state": "active", "queue_state_reason": reason}, 408


def job_record(job: Job, queue_position: int | None) -> dict[str, Any]:
    record = job.to_dict()
    record["queue_position"] = queue_position
    return record
