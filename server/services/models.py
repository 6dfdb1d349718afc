"""Training models: LoRA adapters on a base model, and the jobs that train, save and load them.

Each method submits a job and returns its record at once. `present` turns the backend's result
into the wire response inside the worker thread, so large results never convert on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from ..engine.backend import AdamParams, Backend, Example, LoraSpec, ModelInfo
from ..errors import ConflictError, GoneError, NotFoundError, UserError
from ..jobs.engine import JobEngine
from ..jobs.record import Job
from ..jobs.states import JobKind, Phase
from ..storage.paths import CheckpointPath, check_name
from .checkpoints import METADATA_FILE, CheckpointService
from .metrics import MetricHistory
from .sessions import SessionService

logger = logging.getLogger(__name__)

UNNAMED_SAMPLER_PREFIX = "ephemeral-"  # names of sampler weights saved without a name
KEEP_UNNAMED_SAMPLERS = 4  # unnamed sampler weights kept per model; older ones are deleted

Present = Callable[[Any], Any]


class ModelStore(Protocol):
    def save_model(self, record: dict[str, Any]) -> None: ...

    def load_models(self) -> list[dict[str, Any]]: ...


@dataclass
class TrainingModel:
    model_id: str
    session_id: str | None
    base_model: str
    lora: LoraSpec
    created_at: float
    user_metadata: dict[str, Any] | None = None
    info: ModelInfo | None = None
    unloaded: bool = False
    steps: int = 0  # optimizer steps taken
    checkpoints: list[str] = field(default_factory=list)
    restored: bool = False  # loaded from the store at start, so its adapter is no longer in memory
    failure: str | None = None  # why create_model failed; such a model takes no further work

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "session_id": self.session_id, "base_model": self.base_model,
                "lora_rank": self.lora.rank, "created_at": self.created_at, "unloaded": self.unloaded,
                "steps": self.steps, "user_metadata": self.user_metadata, "ready": self.info is not None,
                "loaded": self.info is not None and not self.unloaded, "restored": self.restored,
                "checkpoints": list(self.checkpoints)}

    def to_record(self) -> dict[str, Any]:
        """Return the fields that outlive the process, JSON-ready, for the model store."""
        return {"model_id": self.model_id, "session_id": self.session_id, "base_model": self.base_model,
                "lora": asdict(self.lora), "created_at": self.created_at, "user_metadata": self.user_metadata,
                "unloaded": self.unloaded, "steps": self.steps, "checkpoints": list(self.checkpoints)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TrainingModel:
        return cls(record["model_id"], record["session_id"], record["base_model"], LoraSpec(**record["lora"]),
                   record["created_at"], record.get("user_metadata"), unloaded=record.get("unloaded", False),
                   steps=record.get("steps", 0), checkpoints=list(record.get("checkpoints", [])), restored=True)


class ModelService:
    def __init__(self, backend: Backend, jobs: JobEngine, checkpoints: CheckpointService,
                 sessions: SessionService, publish: Callable[..., None], catalogue_names: list[str],
                 history: MetricHistory, *, store: ModelStore | None = None) -> None:
        self.backend = backend
        self.store = store
        self.history = history
        self.jobs = jobs
        self.checkpoints = checkpoints
        self.sessions = sessions
        self.publish = publish
        self.catalogue_names = catalogue_names
        self._models: dict[str, TrainingModel] = {}
        self._watchers: set[asyncio.Task] = set()

    # ---- registry --------------------------------------------------------------------------

    def get(self, model_id: str) -> TrainingModel:
        model = self._models.get(model_id)
        if model is None:
            raise NotFoundError(f"model {model_id} not found; create it with create_model", field="model_id")
        if model.failure is not None:
            raise GoneError(f"model {model_id} could not be created: {model.failure}", field="model_id")
        if model.unloaded:
            raise GoneError(f"model {model_id} was unloaded", field="model_id")
        return model

    def known(self, model_id: str) -> TrainingModel:
        """Return a model whatever its state (unloaded, failed or restored); 404 if it never existed."""
        model = self._models.get(model_id)
        if model is None:
            raise NotFoundError(f"model {model_id} not found", field="model_id")
        return model

    def all(self) -> list[TrainingModel]:
        return list(self._models.values())

    def info(self, model_id: str) -> TrainingModel:
        model = self.get(model_id)
        if model.restored:
            raise GoneError(f"model {model_id} was created by an earlier server run and its adapter is no "
                                "longer in memory; create a new model and load one of its checkpoints with "
                                "load_weights", field="model_id")
        if model.info is None:
            raise ConflictError(f"model {model_id} is still being created; wait for its create_model future",
                                field="model_id")
        return model

    # ---- persistence -----------------------------------------------------------------------

    def restore(self) -> int:
        """Register the models of earlier runs as not loaded, with the checkpoints found on disk.

        It blocks on database and folder reads, so call it before serving. Returns the number restored.
        """
        if self.store is None:
            return 0
        repair_checkpoint_folders(self.checkpoints.root)
        restored = 0
        for record in self.store.load_models():
            if record["model_id"] in self._models:
                continue
            model = TrainingModel.from_record(record)
            # The folders decide, because a crash can fall between a checkpoint's metadata and the record.
            model.checkpoints = [entry["tinker_path"] for entry in self.checkpoints.list_for_model(model.model_id)]
            self._models[model.model_id] = model
            restored += 1
        return restored

    def _persist(self, model: TrainingModel) -> None:
        if self.store is not None:
            self.store.save_model(model.to_record())

    # ---- jobs ------------------------------------------------------------------------------

    def create_model(self, session_id: str, base_model: str, lora: LoraSpec,
                     user_metadata: dict[str, Any] | None, present: Present) -> Job:
        session = self.sessions.get_open(session_id)
        model_id = f"model-{uuid.uuid4().hex[:12]}"
        model = TrainingModel(model_id, session_id, base_model, lora, time.time(), user_metadata)
        self._models[model_id] = model
        session.model_ids.append(model_id)
        self._persist(model)

        def work(progress):
            progress(Phase.LOADING, 0, 1)
            model.info = self.backend.create_model(model_id, base_model, lora)
            progress(Phase.LOADING, 1, 1)
            return present(model)

        job = self.jobs.submit(JobKind.CREATE_MODEL.value, work, model_id=model_id, session_id=session_id,
                               ordered=False)
        self._on_done(job, lambda: self.publish("model.created", model.to_dict(), model_id=model_id,
                                                session_id=session_id),
                      on_failure=lambda: self._mark_failed(model, job))
        return job

    def _mark_failed(self, model: TrainingModel, job: Job) -> None:
        model.failure = (job.error or {}).get("message", f"create_model ended {job.state.value}")
        model.unloaded = True
        self._persist(model)

    def unload(self, model_id: str, present: Present) -> Job:
        model = self.get(model_id)

        def work(progress):
            self.backend.unload_model(model_id)
            model.unloaded = True
            self._persist(model)
            return present(model_id)

        job = self.jobs.submit(JobKind.UNLOAD_MODEL.value, work, model_id=model_id, session_id=model.session_id)
        self._on_done(job, lambda: self.publish("model.unloaded", {"model_id": model_id}, model_id=model_id))
        return job

    def forward(self, model_id: str, seq_id: int | None, examples: Callable[[int], list[Example]], loss_fn: str,
                loss_fn_config: dict[str, float] | None, present: Present, *, backward: bool,
                timeout_s: float | None = None) -> Job:
        model = self.info(model_id)
        vocab_size = model.info.vocab_size

        def work(progress):
            progress(Phase.PREPARING, 0, 1)
            batch = examples(vocab_size)
            started = time.perf_counter()
            run = self.backend.forward_backward if backward else self.backend.forward
            result = run(model_id, batch, loss_fn, loss_fn_config, progress)
            if backward:
                self._report_step_metrics(model, batch, result.metrics, time.perf_counter() - started, progress)
            return present(result)

        kind = JobKind.FORWARD_BACKWARD if backward else JobKind.FORWARD
        return self.jobs.submit(kind.value, work, model_id=model_id, session_id=model.session_id, seq_id=seq_id,
                                timeout_s=timeout_s)

    def optim_step(self, model_id: str, seq_id: int | None, params: AdamParams, present: Present,
                   timeout_s: float | None = None) -> Job:
        model = self.info(model_id)

        def work(progress):
            metrics = self.backend.optim_step(model_id, params, progress)
            model.steps += 1
            self._persist(model)
            chart = {_bare(name): value for name, value in metrics.items()}
            chart.setdefault("learning_rate", params.learning_rate)
            self.history.record(model_id, model.steps, chart)
            progress.publish_metrics(chart, model.steps)
            return present(metrics)

        return self.jobs.submit(JobKind.OPTIM_STEP.value, work, model_id=model_id, session_id=model.session_id,
                                seq_id=seq_id, timeout_s=timeout_s)

    def save_weights(self, model_id: str, seq_id: int | None, name: str | None, overwrite: bool,
                     present: Present) -> Job:
        model = self.info(model_id)
        path = CheckpointPath(model_id, "weights", check_name(name) if name else f"step-{seq_id or 0:06d}")
        if self.checkpoints.exists(path) and not overwrite:
            raise UserError(f"checkpoint {path.uri()} already exists; choose another name or pass overwrite=true",
                            field="path")
        return self._save(model, path, seq_id, JobKind.SAVE_WEIGHTS, with_optimizer=True,
                          present=lambda: present(path.uri()))

    def save_for_sampler(self, model_id: str, seq_id: int | None, name: str | None,
                         register_sampler: Callable[[str, CheckpointPath], str], present: Present) -> Job:
        """Save sampler weights; without a name, also open a sampling session on them (path is then null)."""
        model = self.info(model_id)
        if name:
            path = CheckpointPath(model_id, "sampler_weights", check_name(name))
            return self._save(model, path, seq_id, JobKind.SAVE_WEIGHTS_FOR_SAMPLER, with_optimizer=False,
                              present=lambda: present({"path": path.uri(), "sampling_session_id": None}))
        path = CheckpointPath(model_id, "sampler_weights",
                              f"{UNNAMED_SAMPLER_PREFIX}{seq_id or 0:06d}-{uuid.uuid4().hex[:8]}")

        def answer():
            sampler_id = register_sampler(model.base_model, path)
            self._prune_unnamed_samplers(model, keep=path)
            return present({"path": None, "sampling_session_id": sampler_id})

        return self._save(model, path, seq_id, JobKind.SAVE_WEIGHTS_FOR_SAMPLER, with_optimizer=False,
                          present=answer)

    def _prune_unnamed_samplers(self, model: TrainingModel, keep: CheckpointPath) -> None:
        """Delete all but the newest unnamed sampler weights of a model; runs in the worker thread.

        An RL loop saves unnamed sampler weights at every iteration (tens of MB each for SmolLM2), so
        without pruning the disk fills. Sampling clients on a pruned save get a clear 404.
        """
        folder = self.checkpoints.directory(keep).parent
        unnamed = sorted((entry for entry in folder.glob(f"{UNNAMED_SAMPLER_PREFIX}*") if entry.is_dir()),
                         key=lambda entry: entry.stat().st_mtime)
        for entry in unnamed[:-KEEP_UNNAMED_SAMPLERS]:
            if entry.name == keep.name:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            uri = CheckpointPath(model.model_id, "sampler_weights", entry.name).uri()
            if uri in model.checkpoints:
                model.checkpoints.remove(uri)
            logger.info("model %s: removed unnamed sampler weights %s", model.model_id, entry.name)

    def load_weights(self, model_id: str, seq_id: int | None, uri: str, with_optimizer: bool,
                     present: Present) -> Job:
        model = self.info(model_id)
        path, metadata = self.checkpoints.resolve(uri)
        if metadata.get("base_model") != model.base_model:
            raise UserError(f"checkpoint {uri} was trained on {metadata.get('base_model')}, "
                            f"but model {model_id} uses {model.base_model}", field="path")
        if with_optimizer and path.kind != "weights":
            raise UserError(f"checkpoint {uri} contains sampler weights without optimizer state; "
                            "load a tinker://.../weights/... path or pass optimizer=false", field="optimizer")
        directory = self.checkpoints.directory(path)

        def work(progress):
            self.backend.load_adapter(model_id, directory, with_optimizer, progress)
            return present(uri)

        return self.jobs.submit(JobKind.LOAD_WEIGHTS.value, work, model_id=model_id, session_id=model.session_id,
                                seq_id=seq_id)

    def _save(self, model: TrainingModel, path: CheckpointPath, seq_id: int | None, kind: JobKind,
              with_optimizer: bool, present: Callable[[], Any]) -> Job:
        def work(progress):
            self.write_checkpoint(model, path, with_optimizer, progress)
            return present()

        job = self.jobs.submit(kind.value, work, model_id=model.model_id, session_id=model.session_id, seq_id=seq_id)
        self._on_done(job, lambda: self.publish("checkpoint.saved", {"path": path.uri(), "kind": path.kind},
                                                model_id=model.model_id, session_id=model.session_id))
        return job

    def write_checkpoint(self, model: TrainingModel, path: CheckpointPath, with_optimizer: bool, progress) -> None:
        """Write a checkpoint and its metadata; blocking, for worker threads."""
        directory = self.checkpoints.directory(path)
        self.backend.save_adapter(model.model_id, directory, with_optimizer, progress)
        # The metadata lists the checkpoint, so the tensors must be on disk before it is written.
        sync_folder(directory)
        self.checkpoints.write_metadata(path, {"model_id": model.model_id, "base_model": model.base_model,
                                               "lora_rank": model.lora.rank, "train_attn": model.lora.train_attn,
                                               "train_mlp": model.lora.train_mlp,
                                               "train_unembed": model.lora.train_unembed, "kind": path.kind,
                                               "name": path.name, "steps": model.steps,
                                               "with_optimizer": with_optimizer})
        if path.uri() not in model.checkpoints:
            model.checkpoints.append(path.uri())
        self._persist(model)

    def _report_step_metrics(self, model: TrainingModel, batch: list[Example], metrics: dict[str, float],
                             elapsed_s: float, progress) -> None:
        """Record the loss per weighted token and the throughput of one forward_backward."""
        tokens = sum(len(example.tokens) for example in batch)
        weight_sum = sum(float(example.loss_inputs["weights"].abs().sum()) if "weights" in example.loss_inputs
                         else len(example.tokens) for example in batch)
        chart = {"tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else 0.0}
        if "loss:sum" in metrics:
            chart["loss"] = metrics["loss:sum"] / weight_sum if weight_sum else metrics["loss:sum"]
        step = model.steps + 1  # the optimizer step this gradient feeds
        self.history.record(model.model_id, step, chart)
        progress.publish_metrics(chart, step)

    def _on_done(self, job: Job, on_success: Callable[[], None],
                 on_failure: Callable[[], None] | None = None) -> None:
        """Run on_success (or on_failure) on the event loop once the job ends."""

        async def watch():
            await job.done.wait()
            if job.state.value == "succeeded":
                on_success()
            elif on_failure is not None:
                on_failure()

        task = asyncio.get_running_loop().create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)


def sync_folder(directory: Path) -> None:
    """Flush a folder's files and its entry list to disk, so a power loss cannot undo them."""
    for item in directory.iterdir():
        if item.is_file():
            descriptor = os.open(item, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
    for folder in (directory, directory.parent):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def repair_checkpoint_folders(root: Path) -> None:
    """Undo what a crash in the middle of a checkpoint save left behind; run while no save is running.

    The backend writes a checkpoint into a `.<name>.*.tmp` staging folder and, when it overwrites one,
    moves the old folder to `.<name>.old` first. A crash can leave the staging folder, or the old
    checkpoint under its `.old` name beside a new folder that has no metadata yet (or none at all).
    """
    for kind_folder in root.glob("*/*"):
        if not kind_folder.is_dir():
            continue
        for entry in list(kind_folder.iterdir()):
            if not entry.is_dir() or not entry.name.startswith("."):
                continue
            if entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)
                logger.info("removed %s, the staging folder of an interrupted checkpoint save", entry)
            elif entry.name.endswith(".old"):
                _restore_retired_checkpoint(entry, kind_folder / entry.name[1:-len(".old")])


def _restore_retired_checkpoint(retired: Path, target: Path) -> None:
    if (target / METADATA_FILE).is_file():
        shutil.rmtree(retired, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    os.replace(retired, target)
    logger.warning("checkpoint %s: a save that overwrote it was interrupted; restored the previous version", target)


def _bare(metric_name: str) -> str:
    """Drop the `:reduction` suffix of a Tinker metric name."""
    return metric_name.split(":", 1)[0]
