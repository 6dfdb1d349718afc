"""Server-side supervised fine-tuning: one job runs many optimizer steps on an existing model.

A job reads a JSONL dataset, inline or from the server's data folder. The dataset is tokenized
with the model's tokenizer when the job is submitted, so a bad row is rejected with a 400 at once.
The job then trains through the backend's forward_backward and optim_step in the model's lane,
in arrival order with the SDK's own calls. A gradient that an earlier forward_backward left without
an optim_step is applied together with the first step, as it would be by the SDK's next optim_step.

Row formats:
- `{"messages": [{"role": ..., "content": ...}, ...]}` is rendered with the tokenizer's chat
  template, and the loss covers only the tokens of assistant turns (their end-of-turn marker too).
- `{"prompt": ..., "completion": ...}` is tokenized as prompt + completion + the end-of-sequence
  token, and the loss covers only the completion and that end token.
A row longer than `max_length` tokens is rejected, not truncated, because truncation can silently
drop every token that carries loss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.backend import AdamParams, Backend, Example, no_progress
from ..errors import JobCancelledError, NotFoundError, UserError
from ..jobs.engine import JobEngine
from ..jobs.record import Job
from ..jobs.states import JobKind, Phase
from ..storage.paths import CheckpointPath
from .checkpoints import CheckpointService
from .metrics import MetricHistory
from .models import ModelService, TrainingModel

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine")
CHAT_ROLES = ("system", "user", "assistant", "tool")
CHECKPOINT_PREFIX = "sft-step-"  # checkpoints are named sft-step-<optimizer steps of the model>
MAX_SFT_STEPS = 1_000_000  # optimizer steps of one job, given as steps or made by epochs
MAX_SFT_BATCH_SIZE = 1024  # rows per step. A batch larger than the dataset repeats rows


@dataclass(frozen=True)
class SftConfig:
    model_id: str
    inline_rows: list[Any] | None  # exactly one of inline_rows and dataset_path is set
    dataset_path: str | None  # relative to the server's data folder
    steps: int | None  # exactly one of steps and epochs is set
    epochs: int | None
    batch_size: int = 8
    learning_rate: float = 1e-4  # peak learning rate, reached after the warmup
    lr_schedule: str = "constant"  # one of LR_SCHEDULES, applied after the warmup
    warmup_steps: int = 0  # linear ramp from learning_rate / warmup_steps up to learning_rate
    save_every: int = 0  # checkpoint cadence in steps, plus one after the last step (0 = off)
    save_on_cancel: bool = False  # save a checkpoint when the job is cancelled or passes its deadline
    seed: int = 0  # seed of the batch order
    max_length: int | None = None  # max tokens per row (None = the model's context length)
    adam: AdamParams = dataclasses.field(default_factory=AdamParams)  # its learning_rate is ignored
    timeout_s: float | None = None  # job deadline (None = the server's job_timeout_s)


@dataclass
class TokenizedRow:
    tokens: list[int]
    weights: list[float]  # 1.0 where the token is trained on, aligned with tokens

    def to_example(self) -> Example:
        """Shift by one: each input token predicts the next, weighted by the next token's weight."""
        return Example(tokens=self.tokens[:-1],
                       loss_inputs={"target_tokens": torch.tensor(self.tokens[1:], dtype=torch.int64),
                                    "weights": torch.tensor(self.weights[1:], dtype=torch.float32)})


class SftService:
    def __init__(self, backend: Backend, jobs: JobEngine, models: ModelService, checkpoints: CheckpointService,
                 history: MetricHistory, publish_threadsafe: Callable[..., None], data_dir: Path) -> None:
        self.backend = backend
        self.jobs = jobs
        self.models = models
        self.checkpoints = checkpoints
        self.history = history
        self.publish_threadsafe = publish_threadsafe
        self.data_dir = data_dir

    async def submit(self, config: SftConfig) -> Job:
        """Validate the request, tokenize the dataset and queue the job in the model's lane."""
        model = self.models.info(config.model_id)
        _check_config(config)
        max_length = _max_length(config.max_length, model.info.max_context)
        source = self._dataset_file(config.dataset_path) if config.dataset_path is not None else None

        # Reading and tokenizing can take seconds on a large dataset, so it stays off the event loop.
        # NOTE: the request still waits for it, so a very large dataset makes POST /jobs slow.
        rows = await asyncio.to_thread(_load_rows, config, source, model.info.tokenizer_dir, max_length)

        total_steps = _total_steps(config, len(rows))
        run = _SftRun(self, model, config, rows, total_steps)
        job = self.jobs.submit(JobKind.SFT.value, run, model_id=model.model_id, session_id=model.session_id,
                               seq_id=None, ordered=True, timeout_s=config.timeout_s)
        logger.info("sft job %s: model %s, %d rows, %d steps of %d rows", job.id, model.model_id, len(rows),
                    total_steps, config.batch_size)
        return job

    def _dataset_file(self, relative: str) -> Path:
        """Resolve a dataset path inside the data folder, rejecting absolute paths and escapes."""
        field = "dataset.path"
        if not relative or Path(relative).is_absolute():
            raise UserError(f"invalid dataset path {relative!r}: give a path relative to the server's data folder",
                            field=field)
        if "\0" in relative:
            # The operating system cannot take a path with a null byte, and pathlib raises ValueError on it.
            raise UserError(f"invalid dataset path {relative!r}: it contains a null byte", field=field)
        root = self.data_dir.resolve()
        try:
            # resolve() follows symlinks, so a link that points outside the folder is caught here too.
            target = (root / relative).resolve()
            if not target.is_relative_to(root):
                raise UserError(f"invalid dataset path {relative!r}: it leads outside the server's data folder",
                                field=field)
            if not target.exists():
                raise NotFoundError(f"dataset file {relative!r} not found in the server's data folder {root}",
                                    field=field)
            if not target.is_file():
                raise UserError(f"invalid dataset path {relative!r}: it is not a file", field=field)
        except OSError as exc:
            # For example a name longer than the file system allows (ENAMETOOLONG) or a symlink loop.
            raise UserError(f"invalid dataset path {relative!r}: {exc.strerror or exc}", field=field) from exc
        return target

    def save_checkpoint(self, model: TrainingModel, name: str) -> str:
        """Save adapter and optimizer state as tinker://<model_id>/weights/<name>, in the worker thread.

        The write takes no progress callback, so a cancel that arrives meanwhile cannot cut it short.
        """
        path = CheckpointPath(model.model_id, "weights", name)
        self.models.write_checkpoint(model, path, True, no_progress)
        self.publish_threadsafe("checkpoint.saved", {"path": path.uri(), "kind": path.kind},
                                model_id=model.model_id, session_id=model.session_id)
        logger.info("sft: saved %s after %d steps", path.uri(), model.steps)
        return path.uri()


class _SftRun:
    """The work of one SFT job: called once, in a worker thread, with the job's progress callback."""

    def __init__(self, service: SftService, model: TrainingModel, config: SftConfig, rows: list[TokenizedRow],
                 total_steps: int) -> None:
        self.service = service
        self.model = model
        self.config = config
        self.rows = rows
        self.total_steps = total_steps
        self.order = _BatchOrder(len(rows), config.batch_size, config.seed)
        self.saved: dict[int, str] = {}  # model step -> checkpoint path written by this job
        self.last_metrics: dict[str, float] = {}
        self.steps_done = 0

    def __call__(self, progress) -> dict[str, Any]:
        try:
            for step in range(1, self.total_steps + 1):
                self._train_step(step, progress)
                if self.config.save_every and step % self.config.save_every == 0:
                    self._save()
                progress(Phase.OPTIMIZER, step, self.total_steps)
        except JobCancelledError:
            if self.config.save_on_cancel:
                self._save()
            logger.info("sft on model %s stopped after %d of %d steps", self.model.model_id, self.steps_done,
                        self.total_steps)
            raise

        if self.config.save_every:
            self._save()
        return {"model_id": self.model.model_id, "steps": self.steps_done, "total_steps": self.total_steps,
                "model_steps": self.model.steps, "metrics": self.last_metrics,
                "checkpoints": [self.saved[step] for step in sorted(self.saved)]}

    def _train_step(self, step: int, progress) -> None:
        """Run one forward_backward and optim_step. A cancel can land only before the gradient is applied."""
        progress(Phase.PREPARING, step - 1, self.total_steps)
        batch = [self.rows[index].to_example() for index in self.order.next_batch()]
        learning_rate = scheduled_learning_rate(self.config, step - 1, self.total_steps)
        model_id = self.model.model_id

        started = time.perf_counter()
        # The backend reports micro-batches; the job record shows steps, so its progress is rescaled.
        result = self.service.backend.forward_backward(model_id, batch, "cross_entropy", None,
                                                       _StepProgress(progress, step - 1, self.total_steps))
        # forward_backward has added the gradient to the adapter. The optimizer step runs without a
        # cancel point, so a cancel never leaves a gradient behind for the model's next request.
        params = dataclasses.replace(self.config.adam, learning_rate=learning_rate)
        optimizer_metrics = self.service.backend.optim_step(model_id, params, no_progress)
        elapsed_s = time.perf_counter() - started

        self.model.steps += 1
        self.service.models._persist(self.model)
        self.steps_done = step
        weight_sum = sum(float(example.loss_inputs["weights"].sum()) for example in batch)
        tokens = sum(len(example.tokens) for example in batch)
        metrics = {"loss": result.metrics["loss:sum"] / weight_sum, "learning_rate": learning_rate,
                   "grad_norm": optimizer_metrics.get("grad_norm:mean", 0.0),
                   "tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0}
        self.last_metrics = metrics
        self.service.history.record(model_id, self.model.steps, metrics)
        progress.publish_metrics(metrics, self.model.steps)

    def _save(self) -> None:
        if self.model.steps in self.saved:
            return
        self.saved[self.model.steps] = self.service.save_checkpoint(
            self.model, f"{CHECKPOINT_PREFIX}{self.model.steps}")


class _StepProgress:
    """Pass the backend's progress calls on as `completed` steps of the job, keeping the cancel checks."""

    def __init__(self, progress, completed: int, total: int) -> None:
        self.progress = progress
        self.completed = completed
        self.total = total

    def __call__(self, phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None:
        self.progress(phase, self.completed, self.total)


class _BatchOrder:
    """Row indices in epochs, each shuffled by one seeded generator. A batch may span epochs.

    A batch costs O(batch_size), plus one shuffle of O(row_count) each time an epoch starts.
    """

    def __init__(self, row_count: int, batch_size: int, seed: int) -> None:
        self.row_count = row_count
        self.batch_size = batch_size
        self.random = random.Random(seed)
        self.epoch: list[int] = []
        self.position = 0  # index into self.epoch of the next row to hand out

    def next_batch(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self.position == len(self.epoch):
                self.epoch = list(range(self.row_count))
                self.random.shuffle(self.epoch)
                self.position = 0
            end = min(len(self.epoch), self.position + self.batch_size - len(batch))
            batch.extend(self.epoch[self.position:end])
            self.position = end
        return batch


def scheduled_learning_rate(config: SftConfig, step_index: int, total_steps: int) -> float:
    """Return the learning rate of a 0-based step: a linear warmup, then the schedule down from the peak."""
    peak = config.learning_rate
    if step_index < config.warmup_steps:
        return peak * (step_index + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    fraction = (step_index - config.warmup_steps) / decay_steps
    if config.lr_schedule == "linear":
        return peak * (1.0 - fraction)
    if config.lr_schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * fraction))
    return peak


def _check_config(config: SftConfig) -> None:
    if (config.steps is None) == (config.epochs is None):
        raise UserError("give exactly one of steps and epochs", field="steps")
    if (config.inline_rows is None) == (config.dataset_path is None):
        raise UserError("give the dataset as exactly one of {\"inline\": [rows]} and {\"path\": \"file.jsonl\"}",
                        field="dataset")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"invalid lr_schedule {config.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}",
                        field="lr_schedule")


def _total_steps(config: SftConfig, row_count: int) -> int:
    if config.steps is not None:
        return config.steps
    total_steps = math.ceil(config.epochs * row_count / config.batch_size)
    if total_steps > MAX_SFT_STEPS:
        raise UserError(f"invalid epochs {config.epochs}: {config.epochs} epochs of {row_count} rows in batches of "
                        f"{config.batch_size} make {total_steps} steps, more than the limit of {MAX_SFT_STEPS}. "
                        "Give fewer epochs or a larger batch_size", field="epochs")
    return total_steps


def _max_length(requested: int | None, max_context: int) -> int:
    if requested is None:
        return max_context
    if requested > max_context:
        raise UserError(f"invalid max_length {requested}: the model's context is {max_context} tokens",
                        field="max_length")
    return requested


# ---- dataset ---------------------------------------------------------------------------------


def _load_rows(config: SftConfig, source: Path | None, tokenizer_dir: Path, max_length: int) -> list[TokenizedRow]:
    """Parse and tokenize every row. Blocking, so it runs in a worker thread."""
    if source is not None:
        raw_rows = list(_read_jsonl(source, config.dataset_path))
        field = "dataset.path"
    else:
        raw_rows = [(f"dataset.inline[{index}]", row) for index, row in enumerate(config.inline_rows)]
        field = "dataset.inline"
    if not raw_rows:
        raise UserError("the dataset is empty: give at least one row", field=field)

    tokenizer = _tokenizer(str(tokenizer_dir))
    rows = []
    for where, raw in raw_rows:
        row = _tokenize_row(tokenizer, raw, where, field)
        if len(row.tokens) > max_length:
            raise UserError(f"{where} has {len(row.tokens)} tokens, more than max_length {max_length}. "
                            "Shorten it or raise max_length", field=field)
        if len(row.tokens) < 2 or not any(row.weights[1:]):
            raise UserError(f"{where} has no tokens to train on: it needs an assistant message or a completion "
                            "after the first token", field=field)
        rows.append(row)
    return rows


def _read_jsonl(path: Path, shown_name: str):
    """Yield (where, row) for each non-blank line, where `where` names the line for error messages."""
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number} of {shown_name}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"line {number} of {shown_name} is not valid JSON: {exc}",
                                    field="dataset.path") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"dataset file {shown_name} is not valid UTF-8: {exc}", field="dataset.path") from exc


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tokenize_row(tokenizer, raw: Any, where: str, field: str) -> TokenizedRow:
    if isinstance(raw, dict) and "messages" in raw:
        return _tokenize_chat(tokenizer, raw["messages"], where, field)
    if isinstance(raw, dict) and "prompt" in raw and "completion" in raw:
        prompt, completion = raw["prompt"], raw["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise UserError(f"{where}: prompt and completion must be strings and the completion non-empty",
                            field=field)
        prompt_tokens = tokenizer.encode(prompt, add_special_tokens=True)
        completion_tokens = tokenizer.encode(completion, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            completion_tokens.append(tokenizer.eos_token_id)
        return TokenizedRow(prompt_tokens + completion_tokens,
                            [0.0] * len(prompt_tokens) + [1.0] * len(completion_tokens))
    raise UserError(f"{where} is not a training row: expected {{\"messages\": [...]}} or "
                    "{\"prompt\": ..., \"completion\": ...}", field=field)


def _tokenize_chat(tokenizer, messages: Any, where: str, field: str) -> TokenizedRow:
    """Render the chat turn by turn, and train on the tokens that each assistant turn adds."""
    _check_messages(messages, where, field)
    if not tokenizer.chat_template:
        raise UserError(f"{where}: this model's tokenizer has no chat template, so use prompt/completion rows",
                        field=field)

    tokens: list[int] = []
    weights: list[float] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        after = _render(tokenizer, messages[:index + 1], generation_prompt=False)
        # Templates that rewrite earlier turns (for example dropping reasoning) break this prefix rule.
        if after[:len(before)] != before or before[:len(tokens)] != tokens:
            raise UserError(f"{where}: the model's chat template renders earlier turns differently once a later "
                            "turn is added, so assistant tokens cannot be told apart. Use prompt/completion rows",
                            field=field)
        weights += [0.0] * (len(before) - len(tokens)) + [1.0] * (len(after) - len(before))
        tokens = after
    return TokenizedRow(tokens, weights)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def _check_messages(messages: Any, where: str, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list", field=field)
    for index, message in enumerate(messages):
        if (not isinstance(message, dict) or message.get("role") not in CHAT_ROLES
                or not isinstance(message.get("content"), str)):
            raise UserError(f"{where}: message {index} must be {{\"role\": one of {', '.join(CHAT_ROLES)}, "
                            "\"content\": string}", field=field)
    if messages[0]["role"] == "assistant":
        # The turns before an assistant message are rendered on their own, and chat templates
        # cannot render an empty chat.
        raise UserError(f"{where}: the first message is from the assistant. Start with a system or user message",
                        field=field)
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError(f"{where}: no assistant message to train on", field=field)
