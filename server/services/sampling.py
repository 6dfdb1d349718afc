"""Sampling sessions and sampling jobs.

A sampling session is bound to a base model alone or to saved sampler weights; a sample request
names a session, a tinker:// path, or a base model directly.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..engine.backend import Backend, SamplingParams
from ..errors import NotFoundError, UserError
from ..jobs.engine import JobEngine
from ..jobs.record import Job
from ..jobs.states import JobKind
from ..storage.paths import CheckpointPath
from .checkpoints import CheckpointService
from .sessions import SessionService


@dataclass
class SamplerSession:
    id: str
    session_id: str | None
    base_model: str
    model_path: str | None
    adapter_dir: Path | None
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"sampler_id": self.id, "base_model": self.base_model, "model_path": self.model_path}


class SamplingService:
    def __init__(self, backend: Backend, jobs: JobEngine, checkpoints: CheckpointService,
                 catalogue_names: list[str], sessions: SessionService | None = None) -> None:
        self.backend = backend
        self.sessions = sessions
        self.jobs = jobs
        self.checkpoints = checkpoints
        self.catalogue_names = catalogue_names
        self._samplers: dict[str, SamplerSession] = {}

    def create_session(self, session_id: str | None, base_model: str | None, model_path: str | None) -> SamplerSession:
        if session_id is not None and self.sessions is not None:
            self.sessions.get_open(session_id)
        base, adapter_dir = self._resolve_source(base_model, model_path)
        sampler = SamplerSession(f"sampler-{uuid.uuid4().hex[:16]}", session_id, base, model_path, adapter_dir,
                                 time.time())
        self._samplers[sampler.id] = sampler
        return sampler

    def register_checkpoint(self, base_model: str, path: CheckpointPath) -> str:
        """Open a sampling session on freshly saved sampler weights; returns its id."""
        sampler = SamplerSession(f"sampler-{uuid.uuid4().hex[:16]}", None, base_model, path.uri(),
                                 self.checkpoints.directory(path), time.time())
        self._samplers[sampler.id] = sampler
        return sampler.id

    def get(self, sampler_id: str) -> SamplerSession:
        sampler = self._samplers.get(sampler_id)
        if sampler is None:
            raise NotFoundError(f"sampling session {sampler_id} not found", field="sampling_session_id")
        return sampler

    def sample(self, *, sampler_id: str | None, base_model: str | None, model_path: str | None,
               prompt: list[int], num_samples: int, params: SamplingParams, prompt_logprobs: bool,
               topk_prompt_logprobs: int, present: Callable[[Any], Any], session_id: str | None = None,
               timeout_s: float | None = None) -> Job:
        if sampler_id:
            sampler = self.get(sampler_id)
            base, adapter_dir, session_id = sampler.base_model, sampler.adapter_dir, sampler.session_id or session_id
            if adapter_dir is not None and not adapter_dir.is_dir():
                raise NotFoundError(f"the sampler weights of sampling session {sampler_id} ({sampler.model_path}) "
                                    "were deleted: only the newest unnamed sampler weights of a model are kept; "
                                    "save with a name to keep them", field="sampling_session_id")
        else:
            base, adapter_dir = self._resolve_source(base_model, model_path)
        if not prompt:
            raise UserError("prompt is empty: give at least one token", field="prompt")

        def work(progress):
            return present(self.backend.sample(base, adapter_dir, prompt, num_samples, params, prompt_logprobs,
                                               topk_prompt_logprobs, progress))

        return self.jobs.submit(JobKind.SAMPLE.value, work, model_id=sampler_id, session_id=session_id,
                                ordered=False, timeout_s=timeout_s)

    def _resolve_source(self, base_model: str | None, model_path: str | None) -> tuple[str, Path | None]:
        if model_path:
            path, metadata = self.checkpoints.resolve(model_path, field="model_path")
            return metadata["base_model"], self.checkpoints.directory(path)
        if base_model not in self.catalogue_names and not (Path(str(base_model)) / "config.json").is_file():
            raise NotFoundError(f"base model {base_model!r} not found; this server has: "
                                f"{', '.join(self.catalogue_names)}", field="base_model")
        return str(base_model), None
