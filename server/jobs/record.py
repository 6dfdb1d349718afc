"""The job record: what a client sees through GET /api/v1/jobs/{id} and the job events."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .states import TERMINAL_STATES, JobState, Phase


@dataclass
class Progress:
    completed: int = 0
    total: int = 0
    eta_s: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.completed / self.total) if self.total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "total": self.total, "fraction": round(self.fraction, 4),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 3)}


@dataclass(eq=False)
class Job:
    id: str
    kind: str
    model_id: str | None
    session_id: str | None
    seq_id: int | None
    created_at: float
    expires_at: float | None
    state: JobState = JobState.QUEUED
    phase: str = Phase.QUEUED
    progress: Progress = field(default_factory=Progress)
    metrics: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None
    result: Any = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    queue_position: int | None = None
    # Runtime only: the work to run, the flag the worker thread polls, the waiters' event and the
    # deadline timer, which ending the job cancels.
    work: Callable[..., Any] | None = field(default=None, repr=False)
    stop_flag: threading.Event = field(default_factory=threading.Event, repr=False)
    stop_reason: JobState | None = field(default=None, repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    deadline_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def touch(self) -> None:
        self.updated_at = time.time()

    def to_dict(self) -> dict[str, Any]:
        """Shape the record for the job API; the result itself is served by retrieve_future."""
        return {
            "id": self.id,
            "kind": self.kind,
            "model_id": self.model_id,
            "session_id": self.session_id,
            "seq_id": self.seq_id,
            "state": self.state.value,
            "phase": self.phase,
            "progress": self.progress.to_dict(),
            "metrics": dict(self.metrics),
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "finished_at": self.finished_at,
            "cancel_requested": self.cancel_requested,
            "expires_at": self.expires_at,
            "queue_position": self.queue_position if self.state is JobState.QUEUED else None,
        }
