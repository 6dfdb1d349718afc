"""Model routes: create_model, get_info, unload_model, and the model listing."""

from __future__ import annotations

from ..engine.backend import LoraSpec
from pathlib import Path

from quart import request

from ..errors import NotFoundError, UserError
from . import presenters


async def create_model(services, body):
    if body.lora_config is None:
        raise UserError("lora_config is required: this server trains LoRA adapters only", field="lora_config")
    lora = LoraSpec(rank=body.lora_config.rank, seed=body.lora_config.seed, train_mlp=body.lora_config.train_mlp,
                    train_attn=body.lora_config.train_attn, train_unembed=body.lora_config.train_unembed)
    if not (lora.train_mlp or lora.train_attn or lora.train_unembed):
        raise UserError("lora_config trains nothing: set at least one of train_attn, train_mlp, train_unembed",
                        field="lora_config")
    _check_base_model(services, body.base_model)
    return services.models.create_model(body.session_id, body.base_model, lora, body.user_metadata,
                                        presenters.created_model)


async def get_info(services, body) -> dict:
    return presenters.model_info(services.models.info(body.model_id))


async def unload_model(services, body):
    return services.models.unload(body.model_id, presenters.unloaded_model)


async def list_models(services, body) -> dict:
    return {"models": [model.to_dict() for model in services.models.all()]}


async def get_model(services, body, model_id: str) -> dict:
    model = services.models.get(model_id)
    return {**model.to_dict(), "checkpoints": services.checkpoints.list_for_model(model_id)}


async def list_checkpoints(services, body, model_id: str) -> dict:
    services.models.known(model_id)
    return {"checkpoints": services.checkpoints.list_for_model(model_id)}


def _check_base_model(services, name: str) -> None:
    if name in services.settings.models or (Path(name) / "config.json").is_file():
        return
    raise NotFoundError(f"base model {name!r} not found; this server has: {', '.join(services.settings.models)}, "
                        "or give the path of a local Hugging Face model folder", field="base_model")


async def metric_history(services, body, model_id: str) -> dict:
    """Return one metric's downsampled history, or the metric names when no name is given."""
    services.models.known(model_id)
    args = request.args
    name = args.get("name")
    if not name:
        return {"model_id": model_id, "names": services.history.names(model_id)}
    try:
        max_points = int(args.get("max_points", "1000"))
    except ValueError:
        raise UserError(f"invalid max_points {args.get('max_points')!r}: expected an integer", field="max_points") from None
    return services.history.series(model_id, name, max_points)


async def weights_info(services, body) -> dict:
    """Describe a checkpoint so the SDK can build a matching model (create_training_client_from_state)."""
    _, metadata = services.checkpoints.resolve(body.tinker_path, field="tinker_path")
    return {"base_model": metadata["base_model"], "is_lora": True, "lora_rank": metadata.get("lora_rank"),
            "train_attn": metadata.get("train_attn"), "train_mlp": metadata.get("train_mlp"),
            "train_unembed": metadata.get("train_unembed")}
