"""The in-process backend: LoRA training and sampling with torch and peft on float32 CPU weights.

Each base model is loaded once and wrapped by one `peft.PeftModel`. Every training model is a
named adapter on it, and every loaded sampler checkpoint is another. Calls on one base hold that
base's lock, because the active adapter is state of the shared peft model. Sample calls that
wait for the lock meanwhile join a queue, and whoever takes the lock next decodes all waiting
calls on the same sampler adapter in one batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from server.engine import lora as lora_files
from server.engine.backend import (
    AdamParams, Example, ForwardResult, LoraSpec, ModelInfo, ProgressCallback, SampleResult, SamplingParams,
)
from server.engine.batching import pad_micro_batch, plan_micro_batches
from server.engine.losses import compute_loss, resolve_config, validate_examples
from server.engine.sampling import SampleQueue, SampleRequest, generate, generate_batch, validate_request
from server.errors import ConflictError, JobCancelledError, NotFoundError, UserError

if TYPE_CHECKING:
    from server.engine.catalogue import ModelSpec

logger = logging.getLogger(__name__)

_SAFE_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How often a queued sample call checks whether a batch led by another thread has finished it.
_TURN_POLL_S = 0.005


@dataclass(eq=False)
class _Base:
    spec: ModelSpec
    model: PreTrainedModel
    vocab_size: int
    max_context: int
    lock: threading.RLock = field(default_factory=threading.RLock)
    peft: PeftModel | None = None  # created with the first adapter, wrapping `model` in place
    # Training models on this base, counting those being created. The registry lock guards it.
    users: int = 0
    # Loaded sampler checkpoints, least recently used first: (folder, weights mtime) -> adapter name.
    samplers: OrderedDict[tuple[str, int], str] = field(default_factory=OrderedDict)
    tokenizer: Any = None
    # Guards `tokenizer` alone, so that loading it never waits for a decode running under `lock`.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    sample_queue: SampleQueue = field(default_factory=SampleQueue)


@dataclass(eq=False)
class _TrainingModel:
    model_id: str
    base: _Base
    adapter: str
    config: LoraConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW | None = None
    unloaded: bool = False


class TorchBackend:
    def __init__(self, resolve_model: Callable[[str], ModelSpec], *, micro_batch_tokens: int = 4096,
                 max_loaded_samplers: int = 8, max_batch_sequences: int = 32) -> None:
        if micro_batch_tokens < 1 or max_loaded_samplers < 1 or max_batch_sequences < 1:
            raise ValueError("micro_batch_tokens, max_loaded_samplers and max_batch_sequences must be at least 1")
        self._resolve_model = resolve_model
        self._max_batch_sequences = max_batch_sequences
        self._micro_batch_tokens = micro_batch_tokens
        self._max_loaded_samplers = max_loaded_samplers
        # Guards the registries below. It is never held while waiting for a base lock, because
        # a long forward_backward on one base would then stall every call on every base.
        self._lock = threading.Lock()
        self._bases: dict[str, _Base] = {}
        self._models: dict[str, _TrainingModel] = {}
        self._creating: set[str] = set()

    # Model lifecycle

    def create_model(self, model_id: str, base_model: str, lora: LoraSpec) -> ModelInfo:
        config = lora_files.build_lora_config(lora)
        with self._lock:
            if model_id in self._models or model_id in self._creating:
                raise ConflictError(f"model {model_id!r} already exists")
            base = self._get_base(base_model)
            self._creating.add(model_id)
            base.users += 1  # keeps unload_model from dropping the base while the adapter is added

        state = None
        try:
            with base.lock:
                lora_files.check_targets_exist(base.model, config, base_model)
                adapter = _adapter_name("train", model_id)
                with _seeded(lora.seed):
                    if base.peft is None:
                        base.peft = get_peft_model(base.model, config, adapter_name=adapter)
                        base.peft.eval()
                    else:
                        base.peft.add_adapter(adapter, config)
                state = _TrainingModel(model_id, base, adapter, config, _adapter_parameters(base.peft, adapter))
        finally:
            with self._lock:
                self._creating.discard(model_id)
                if state is None:
                    base.users -= 1
                else:
                    self._models[model_id] = state
        logger.info("created model %s on %s (rank %d, targets %s)", model_id, base_model, config.r,
                    sorted(config.target_modules))
        return self._info(state)

    def unload_model(self, model_id: str) -> None:
        with self._lock:
            state = self._models.pop(model_id, None)
            if state is None:
                raise NotFoundError(f"model {model_id!r} not found")
            base = state.base
            base.users -= 1
            base_in_use = base.users > 0
            if not base_in_use:
                # Sampler adapters go with the base, and a later sample call loads them again.
                self._bases.pop(base.spec.name, None)

        with base.lock:
            state.unloaded = True
            state.optimizer = None
            if base_in_use:
                base.peft.delete_adapter(state.adapter)
        logger.info("unloaded model %s", model_id)

    def model_info(self, model_id: str) -> ModelInfo:
        return self._info(self._get_model(model_id))

    # Training

    def forward(self, model_id: str, examples: list[Example], loss_fn: str,
                loss_fn_config: dict[str, float] | None, progress: ProgressCallback) -> ForwardResult:
        return self._run_batches(model_id, examples, loss_fn, loss_fn_config, progress, backward=False)

    def forward_backward(self, model_id: str, examples: list[Example], loss_fn: str,
                         loss_fn_config: dict[str, float] | None, progress: ProgressCallback) -> ForwardResult:
        """Add the gradient of the summed loss to the adapter's `.grad`, as torch's `backward` would.

        Gradients are summed in separate buffers and added only after the last micro-batch, so a
        cancel at any progress call leaves the model as it was.
        """
        return self._run_batches(model_id, examples, loss_fn, loss_fn_config, progress, backward=True)

    def _run_batches(self, model_id: str, examples: list[Example], loss_fn: str,
                     loss_fn_config: dict[str, float] | None, progress: ProgressCallback,
                     backward: bool) -> ForwardResult:
        config = resolve_config(loss_fn, loss_fn_config)
        state = self._get_model(model_id)
        base = state.base
        validate_examples(examples, loss_fn, base.vocab_size, base.max_context)
        plan = plan_micro_batches([len(example.tokens) for example in examples], self._micro_batch_tokens)

        outputs: list[dict[str, torch.Tensor]] = [{} for _ in examples]
        total_loss = 0.0
        with base.lock:
            self._check_loaded(state)
            base.peft.set_adapter(state.adapter)
            gradients = [torch.zeros_like(param) for param in state.params] if backward else []
            for number, indices in enumerate(plan, start=1):
                batch = pad_micro_batch(examples, indices)
                with torch.set_grad_enabled(backward):
                    logits = base.peft(input_ids=batch.tokens, attention_mask=batch.mask, use_cache=False).logits
                    logprobs = -F.cross_entropy(logits.float().transpose(1, 2), batch.inputs["target_tokens"],
                                                reduction="none")
                    result = compute_loss(loss_fn, logprobs, batch.inputs, batch.mask, config)
                progress("forward", number, len(plan))
                if backward:
                    _accumulate(gradients, result.loss, state.params)
                    progress("backward", number, len(plan))

                total_loss += result.loss.item()
                for row, index in enumerate(indices):
                    length = len(examples[index].tokens)
                    outputs[index]["logprobs"] = logprobs[row, :length].detach().clone()
                    if result.elementwise is not None:
                        outputs[index]["elementwise_loss"] = result.elementwise[row, :length].detach().clone()

            for param, gradient in zip(state.params, gradients):
                param.grad = gradient if param.grad is None else param.grad.add_(gradient)
        return ForwardResult(outputs, {"loss:sum": total_loss})

    def optim_step(self, model_id: str, params: AdamParams, progress: ProgressCallback) -> dict[str, float]:
        _validate_adam(params)
        state = self._get_model(model_id)
        with state.base.lock:
            self._check_loaded(state)
            progress("optimizer step", 0, 1)
            optimizer = self._optimizer(state)
            for group in optimizer.param_groups:
                group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                             weight_decay=params.weight_decay)
            with_grad = [param for param in state.params if param.grad is not None]
            if params.grad_clip_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, params.grad_clip_norm)
            else:
                grad_norm = torch.nn.utils.get_total_norm([param.grad for param in with_grad])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # The step is applied, so a cancel requested now comes too late to undo anything.
        with contextlib.suppress(JobCancelledError):
            progress("optimizer step", 1, 1)
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": params.learning_rate}

    def _optimizer(self, state: _TrainingModel) -> torch.optim.AdamW:
        if state.optimizer is None:
            state.optimizer = torch.optim.AdamW(state.params)
        return state.optimizer

    # Checkpoints

    def save_adapter(self, model_id: str, directory: Path, with_optimizer: bool, progress: ProgressCallback) -> None:
        state = self._get_model(model_id)
        with state.base.lock:
            self._check_loaded(state)
            weights = _adapter_state(state.base.peft, state.adapter)
            optimizer_state = self._optimizer(state).state_dict() if with_optimizer else None
            config = copy.deepcopy(state.base.peft.peft_config[state.adapter])
            # peft records the base's folder here; the catalogue name is what a sampler is asked for.
            config.base_model_name_or_path = state.base.spec.name
            lora_files.write_adapter(Path(directory), weights, config, optimizer_state, progress)
        logger.info("saved model %s to %s (optimizer: %s)", model_id, directory, with_optimizer)

    def load_adapter(self, model_id: str, directory: Path, with_optimizer: bool, progress: ProgressCallback) -> None:
        """Replace the adapter weights from a checkpoint, and clear pending gradients.

        Without `with_optimizer` the optimizer starts afresh, because Adam moments of other
        weights do not fit the loaded ones.
        """
        directory = Path(directory)
        state = self._get_model(model_id)
        saved_config = lora_files.read_adapter_config(directory)
        lora_files.check_compatible(saved_config, state.config, directory)
        with state.base.lock:
            self._check_loaded(state)
            expected = _adapter_state(state.base.peft, state.adapter)
            weights = lora_files.read_adapter_weights(directory, expected, progress)
            optimizer = None
            if with_optimizer:
                optimizer = torch.optim.AdamW(state.params)
                _load_optimizer_state(optimizer, lora_files.read_optimizer_state(directory), directory)

            set_peft_model_state_dict(state.base.peft, weights, adapter_name=state.adapter)
            for param in state.params:
                param.grad = None
            state.optimizer = optimizer
        logger.info("loaded model %s from %s (optimizer: %s)", model_id, directory, with_optimizer)

    # Sampling

    def sample(self, base_model: str, adapter_dir: Path | None, prompt: list[int], num_samples: int,
               params: SamplingParams, prompt_logprobs: bool, topk_prompt_logprobs: int,
               progress: ProgressCallback) -> SampleResult:
        """Sample from the base model alone (`adapter_dir` None) or with a saved adapter.

        Sampler adapters are copies loaded from disk, so training the model that saved them
        does not change them. Up to `max_loaded_samplers` stay loaded per base, least recently
        used evicted first. Calls without prompt logprobs that wait for the base at the same
        time, on the same adapter, decode in one batch of up to `max_batch_sequences` samples.
        """
        with self._lock:
            base = self._get_base(base_model)
        validate_request(prompt, num_samples, params, topk_prompt_logprobs, base.vocab_size, base.max_context)
        decode = self._decoder(base) if params.stop_strings else None
        adapter_dir = Path(adapter_dir) if adapter_dir is not None else None

        if prompt_logprobs or topk_prompt_logprobs:
            with base.lock:
                with self._sampling_model(base, adapter_dir) as model:
                    return generate(model, prompt, num_samples, params, prompt_logprobs, topk_prompt_logprobs,
                                    decode, progress)

        adapter_key = str(adapter_dir.resolve()) if adapter_dir is not None else None
        request = SampleRequest(prompt, num_samples, params, decode, progress, adapter_key)
        base.sample_queue.put(request)
        # The lock is polled rather than waited for, because a thread that holds it may finish
        # this request in its batch, and this thread must then return without waiting any longer.
        while not request.done.is_set():
            if base.lock.acquire(timeout=_TURN_POLL_S):
                try:
                    self._decode_batch(base, adapter_dir, request)
                finally:
                    base.lock.release()
        return request.outcome()

    def _decode_batch(self, base: _Base, adapter_dir: Path | None, first: SampleRequest) -> None:
        """Decode `first` with the waiting requests that can join it. Needs base.lock."""
        batch = base.sample_queue.take_batch(first, self._max_batch_sequences)
        if not batch:
            return
        if len(batch) > 1:
            logger.debug("sampling %d requests in one batch on %s", len(batch), base.spec.name)
        try:
            with self._sampling_model(base, adapter_dir) as model:
                generate_batch(model, batch)
        except BaseException as error:
            # The other requests' threads wait for their results, so every request must end here.
            for request in batch:
                if not request.done.is_set():
                    request.finish(error=error)

    @contextlib.contextmanager
    def _sampling_model(self, base: _Base, adapter_dir: Path | None) -> Iterator[torch.nn.Module]:
        if adapter_dir is None and base.peft is None:
            yield base.model
        elif adapter_dir is None:
            with base.peft.disable_adapter():
                yield base.peft
        else:
            adapter = self._sampler_adapter(base, adapter_dir)
            base.peft.set_adapter(adapter, inference_mode=True)
            yield base.peft

    def _sampler_adapter(self, base: _Base, directory: Path) -> str:
        """Return the adapter name of a saved checkpoint on `base`, loading it if needed. Needs base.lock."""
        config = lora_files.read_adapter_config(directory)
        if config.base_model_name_or_path not in (None, base.spec.name):
            raise UserError(f"the adapter in {str(directory)!r} was trained on {config.base_model_name_or_path!r}, "
                            f"not on {base.spec.name!r}", field="base_model")
        folder = str(directory.resolve())
        key = (folder, (directory / lora_files.WEIGHTS_FILE).stat().st_mtime_ns)
        if key in base.samplers:
            base.samplers.move_to_end(key)
            return base.samplers[key]

        for stale in [old for old in base.samplers if old[0] == folder]:
            base.peft.delete_adapter(base.samplers.pop(stale))
        while len(base.samplers) >= self._max_loaded_samplers:
            _, evicted = base.samplers.popitem(last=False)
            base.peft.delete_adapter(evicted)

        adapter = _adapter_name("sample", f"{folder}@{key[1]}")
        lora_files.check_targets_exist(base.model, config, base.spec.name)
        config.base_model_name_or_path = None
        if base.peft is None:
            base.peft = get_peft_model(base.model, config, adapter_name=adapter)
            base.peft.eval()
        else:
            base.peft.add_adapter(adapter, config)
        try:
            expected = _adapter_state(base.peft, adapter)
            weights = lora_files.read_adapter_weights(directory, expected, _no_cancel)
            set_peft_model_state_dict(base.peft, weights, adapter_name=adapter)
        except BaseException:
            base.peft.delete_adapter(adapter)
            raise
        base.samplers[key] = adapter
        logger.info("loaded sampler adapter %s on %s", folder, base.spec.name)
        return adapter

    def _decoder(self, base: _Base) -> Callable[[list[int]], str]:
        with base.tokenizer_lock:
            if base.tokenizer is None:
                base.tokenizer = AutoTokenizer.from_pretrained(str(base.spec.tokenizer_dir), local_files_only=True)
            tokenizer = base.tokenizer
        return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=False)

    # Registry

    def _get_base(self, name: str) -> _Base:
        """Return the loaded base model, loading it on first use. Needs self._lock."""
        base = self._bases.get(name)
        if base is None:
            spec = self._resolve_model(name)
            model = AutoModelForCausalLM.from_pretrained(str(spec.model_dir), dtype=torch.float32,
                                                         local_files_only=True)
            model.eval()
            model.requires_grad_(False)
            base = _Base(spec, model, int(model.config.vocab_size), int(model.config.max_position_embeddings))
            self._bases[name] = base
            logger.info("loaded base model %s from %s", name, spec.model_dir)
        return base

    def _get_model(self, model_id: str) -> _TrainingModel:
        with self._lock:
            state = self._models.get(model_id)
        if state is None:
            raise NotFoundError(f"model {model_id!r} not found")
        return state

    @staticmethod
    def _check_loaded(state: _TrainingModel) -> None:
        # Another thread may unload the model between the registry lookup and taking the base lock.
        if state.unloaded:
            raise NotFoundError(f"model {state.model_id!r} not found")

    @staticmethod
    def _info(state: _TrainingModel) -> ModelInfo:
        base = state.base
        return ModelInfo(model_id=state.model_id, base_model=base.spec.name, lora_rank=state.config.r,
                         tokenizer_dir=Path(base.spec.tokenizer_dir), vocab_size=base.vocab_size,
                         max_context=base.max_context)


def _adapter_name(kind: str, key: str) -> str:
    # peft stores adapters in torch ModuleDicts, whose keys may not contain dots.
    if _SAFE_ADAPTER_NAME.fullmatch(key):
        return f"{kind}_{key}"
    return f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _adapter_state(peft_model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    # Without save_embedding_layers=False peft would add the whole base lm_head to the checkpoint
    # whenever the adapter targets it.
    return get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)


def _adapter_parameters(peft_model: PeftModel, adapter: str) -> list[torch.nn.Parameter]:
    marker = f".{adapter}."
    return [param for name, param in peft_model.named_parameters() if marker in name]


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global generator for the block only, so a seeded adapter init is reproducible."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _accumulate(gradients: list[torch.Tensor], loss: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
    if not loss.requires_grad:
        return
    for gradient, part in zip(gradients, torch.autograd.grad(loss, params, allow_unused=True)):
        if part is not None:
            gradient.add_(part)


def _validate_adam(params: AdamParams) -> None:
    checks = {
        "learning_rate": params.learning_rate >= 0,
        "beta1": 0 <= params.beta1 < 1,
        "beta2": 0 <= params.beta2 < 1,
        "eps": params.eps >= 0,
        "weight_decay": params.weight_decay >= 0,
        "grad_clip_norm": params.grad_clip_norm >= 0,
    }
    for name, valid in checks.items():
        if not valid:
            raise UserError(f"invalid adam_params.{name} = {getattr(params, name)!r}: learning_rate, eps, "
                            "weight_decay and grad_clip_norm must be >= 0, betas in [0, 1)",
                            field=f"adam_params.{name}")


def _load_optimizer_state(optimizer: torch.optim.AdamW, state_dict: dict, directory: Path) -> None:
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError) as error:
        raise UserError(f"the optimizer state in {str(directory)!r} does not fit the model: {error}") from error
    for param in optimizer.param_groups[0]["params"]:
        for name, value in optimizer.state.get(param, {}).items():
            if name != "step" and value.shape != param.shape:
                raise UserError(f"the optimizer state in {str(directory)!r} does not fit the model: "
                                f"{name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")


def _no_cancel(phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None:
    """Progress callback for loading a sampler adapter, which the sample call's progress does not cover."""
