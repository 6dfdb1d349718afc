"""LoRA adapter settings and the on-disk adapter format.

A saved adapter is a folder in the format `peft.PeftModel.from_pretrained` reads:
`adapter_model.safetensors` (peft state-dict keys, no adapter name) and `adapter_config.json`,
plus `optimizer.pt` (a `torch.optim.AdamW` state dict) when the optimizer was saved with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from server.engine.backend import LoraSpec, ProgressCallback
from server.errors import NotFoundError, UserError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)

MAX_LORA_RANK = 512
# The scale of the adapter output is LORA_ALPHA / rank, the same for every model on the server.
# NOTE: Tinker does not document its alpha, so 32 is a guess.
LORA_ALPHA = 32

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"


def build_lora_config(lora: LoraSpec) -> LoraConfig:
    """Translate the API's LoRA options into a peft config, rejecting values peft would not honour."""
    if isinstance(lora.rank, bool) or not isinstance(lora.rank, int) or not 1 <= lora.rank <= MAX_LORA_RANK:
        raise UserError(f"invalid LoRA rank {lora.rank!r}: expected an integer from 1 to {MAX_LORA_RANK}",
                        field="rank")
    if lora.seed is not None and (isinstance(lora.seed, bool) or not isinstance(lora.seed, int)):
        raise UserError(f"invalid LoRA seed {lora.seed!r}: expected an integer or null", field="seed")

    targets: list[str] = []
    if lora.train_attn:
        targets.extend(ATTENTION_MODULES)
    if lora.train_mlp:
        targets.extend(MLP_MODULES)
    if lora.train_unembed:
        targets.extend(UNEMBED_MODULES)
    if not targets:
        raise UserError("train_attn, train_mlp and train_unembed are all false, so the adapter would "
                        "train nothing: set at least one to true", field="lora_config")

    # NOTE: with tied embeddings (SmolLM2) an lm_head adapter changes the output projection only, not
    # the input embeddings. peft warns about the tie, but the unmerged adapter computes exactly that.
    # base_model_name_or_path is left unset because peft replaces it with the weights' folder.
    return LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      target_modules=targets, task_type="CAUSAL_LM")


def check_targets_exist(model: torch.nn.Module, config: LoraConfig, base_model: str) -> None:
    """Reject a target module that the base model lacks, so that no LoRA option is silently ignored."""
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(config.target_modules) - suffixes)
    if missing:
        raise UserError(f"base model {base_model!r} has no modules named {missing}; "
                        "turn off the LoRA option that targets them", field="lora_config")


def read_adapter_config(directory: Path) -> LoraConfig:
    """Read a saved adapter's config, raising NotFoundError when the folder contains no adapter."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise NotFoundError(f"no saved adapter in {str(directory)!r}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return LoraConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise UserError(f"invalid adapter config in {str(config_path)!r}: {error}") from error


def check_compatible(saved: LoraConfig, current: LoraConfig, directory: Path) -> None:
    """Reject loading an adapter whose rank or target modules differ from the model's."""
    if saved.r != current.r:
        raise UserError(f"the adapter in {str(directory)!r} has rank {saved.r}, but the model has rank {current.r}; "
                        "create the model with the same rank")
    if set(saved.target_modules) != set(current.target_modules):
        raise UserError(f"the adapter in {str(directory)!r} targets {sorted(saved.target_modules)}, but the model "
                        f"targets {sorted(current.target_modules)}; create the model with the same LoRA options")


def read_adapter_weights(directory: Path, expected: dict[str, torch.Tensor],
                         progress: ProgressCallback) -> dict[str, torch.Tensor]:
    """Read the adapter tensors and check their names and shapes against `expected` before anything is applied."""
    weights = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"the adapter in {str(directory)!r} does not fit the model: "
                        f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")

    total = len(expected)
    for done, (name, tensor) in enumerate(expected.items(), start=1):
        if weights[name].shape != tensor.shape:
            raise UserError(f"tensor {name!r} in {str(directory)!r} has shape {tuple(weights[name].shape)}, "
                            f"expected {tuple(tensor.shape)}")
        weights[name] = weights[name].to(tensor.dtype)
        progress("loading", done, total)
    return weights


def read_optimizer_state(directory: Path) -> dict:
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        raise NotFoundError(f"the checkpoint in {str(directory)!r} has no optimizer state ({OPTIMIZER_FILE}); "
                            "load it without the optimizer")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_adapter(directory: Path, weights: dict[str, torch.Tensor], config: LoraConfig,
                  optimizer_state: dict | None, progress: ProgressCallback) -> None:
    """Write the adapter into a temporary folder beside `directory`, then move it into place.

    A crash or a cancel leaves either the old folder or the complete new one, never a partial
    checkpoint, because `os.replace` of a folder is atomic on POSIX file systems.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        total = len(weights)
        copies: dict[str, torch.Tensor] = {}
        for done, (name, tensor) in enumerate(weights.items(), start=1):
            copies[name] = tensor.detach().to("cpu").contiguous().clone()
            progress("saving", done, total)
        save_file(copies, str(staging / WEIGHTS_FILE))
        config.save_pretrained(str(staging))
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(source: Path, target: Path) -> None:
    # os.replace cannot overwrite a non-empty folder, so an existing one is moved aside first.
    # NOTE: a crash between the two renames leaves the old checkpoint under the `.old` name.
    if target.exists():
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(source, target)
