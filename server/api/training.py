"""Training routes: forward, forward_backward, optim_step, save/load weights."""

from __future__ import annotations

import torch

from ..engine.backend import AdamParams, Example
from ..errors import UserError
from ..storage.paths import SCHEME, check_name, parse
from . import presenters


def to_examples(data, vocab_size: int, field_prefix: str) -> list[Example]:
    """Convert wire datums to dense tensors; runs in the worker thread."""
    examples = []
    for index, datum in enumerate(data):
        tokens = datum.model_input.tokens()
        for position, token in enumerate(tokens):
            if not 0 <= token < vocab_size:
                raise UserError(f"token id {token} at position {position} of datum {index} is outside the "
                                f"vocabulary [0, {vocab_size})",
                                field=f"{field_prefix}[{index}].model_input")
        loss_inputs = {name: _tensor(value, f"{field_prefix}[{index}].loss_fn_inputs.{name}")
                       for name, value in datum.loss_fn_inputs.items()}
        examples.append(Example(tokens=tokens, loss_inputs=loss_inputs))
    return examples


def _tensor(value, field: str) -> torch.Tensor:
    dtype = torch.float32 if value.dtype == "float32" else torch.int64
    try:
        if value.sparse_crow_indices is not None:
            crow = torch.tensor(value.sparse_crow_indices, dtype=torch.int64)
            col = torch.tensor(value.sparse_col_indices, dtype=torch.int64)
            tensor = torch.sparse_csr_tensor(crow, col, torch.tensor(value.data, dtype=dtype), value.shape).to_dense()
        else:
            tensor = torch.tensor(value.data, dtype=dtype)
            if value.shape is not None:
                tensor = tensor.reshape(value.shape)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UserError(f"invalid tensor: {exc}", field=field) from exc
    return tensor.flatten() if tensor.dim() > 1 and tensor.shape[0] == 1 else tensor


async def forward(services, body):
    return _submit_forward(services, body, backward=False)


async def forward_backward(services, body):
    return _submit_forward(services, body, backward=True)


def _submit_forward(services, body, backward: bool):
    spec = body.forward_backward_input if backward else body.forward_input
    prefix = "forward_backward_input.data" if backward else "forward_input.data"
    return services.models.forward(
        body.model_id, body.seq_id, lambda vocab_size: to_examples(spec.data, vocab_size, prefix),
        spec.loss_fn, spec.loss_fn_config, presenters.forward_result, backward=backward, timeout_s=body.timeout_s)


async def optim_step(services, body):
    adam = body.adam_params
    params = AdamParams(learning_rate=adam.learning_rate, beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps,
                        weight_decay=adam.weight_decay, grad_clip_norm=adam.grad_clip_norm)
    return services.models.optim_step(body.model_id, body.seq_id, params, presenters.optim_step_result,
                                      timeout_s=body.timeout_s)


async def save_weights(services, body):
    return services.models.save_weights(body.model_id, body.seq_id, _name(body.path, body.model_id, "weights"),
                                        body.overwrite, presenters.saved_weights)


async def save_weights_for_sampler(services, body):
    return services.models.save_for_sampler(body.model_id, body.seq_id,
                                            _name(body.path, body.model_id, "sampler_weights"),
                                            services.sampling.register_checkpoint, presenters.saved_sampler_weights)


async def load_weights(services, body):
    return services.models.load_weights(body.model_id, body.seq_id, body.path, body.optimizer,
                                        presenters.loaded_weights)


def _name(path: str | None, model_id: str, kind: str) -> str | None:
    """Take the checkpoint name: the SDK sends a bare name, and a full tinker:// path of this model works too."""
    if not path:
        return None
    if path.startswith(SCHEME):
        target = parse(path)
        if target.model_id != model_id or target.kind != kind:
            raise UserError(f"path {path!r} names another model or kind; give a bare name or "
                            f"tinker://{model_id}/{kind}/<name>", field="path")
        return target.name
    return check_name(path)
