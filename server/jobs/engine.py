"""The job engine: every training and sampling request runs here as a background job.

submit() returns at once with a queued Job. Work of one model runs in seq_id order through its
lane; work without a model (or marked unordered) runs as soon as a worker slot is free. The work
itself runs in a worker thread and reports progress through a callback that also delivers
cancellation and deadlines at the next boundary. Every transition updates the record, publishes an
event, calls the listeners and, when a store is attached, persists the record.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from ..errors import ConflictError, JobCancelledError, NotFoundError, QueueFullError, TrainpulseError
from .lanes import Lane
from .record import Job
from .states import SHUTDOWN_MESSAGE, TERMINAL_STATES, JobState, Phase

logger = logging.getLogger(__name__)

Publish = Callable[..., None]
# listener(event_type, job, data): called on the event loop for every job event, after the record changed.
Listener = Callable[[str, Job, dict[str, Any]], None]


class JobStore(Protocol):
    def save(self, job: Job) -> None: ...

    def load(self, job_id: str) -> Job | None: ...

    def is_expired(self, job_id: str) -> bool: ...

    def mark_expired(self, job_ids: Iterable[str]) -> None: ...


@dataclass
class JobLimits:
    workers: int = 4
    job_timeout_s: float = 3600.0
    retention_s: float = 3600.0
    seq_gap_timeout_s: float = 30.0
    max_queued_per_model: int = 64
    max_queued_total: int = 1024


class JobEngine:
    def __init__(self, limits: JobLimits, *, publish: Publish | None = None, store: JobStore | None = None) -> None:
        self.limits = limits
        self._publish = publish or (lambda *args, **kwargs: None)
        self._store = store
        self._jobs: dict[str, Job] = {}
        self._by_seq: dict[tuple[str, int], Job] = {}
        self._lanes: dict[str, Lane] = {}
        self._free_queue: list[Job] = []  # queued jobs outside any lane, waiting for a worker slot
        self._running: set[Job] = set()
        self._listeners: list[Listener] = []
        # Model ids that ever had a job; a rejected seq_id of any other id opens no lane.
        self._known_models: set[str] = set()
        # (model_id, seq_id) rejected with 429 by submit(): the client retries them, so reject_seq keeps the gap.
        self._retry_expected: set[tuple[str, int]] = set()
        self._gap_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="trainpulse-job")
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task | None = None
        self.started_at = time.time()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.limits.workers)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="trainpulse-job-sweeper")

    async def stop(self) -> None:
        """Stop accepting work: queued jobs end cancelled, running ones stop and end failed."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for timer in self._gap_timers.values():
            timer.cancel()
        for job in list(self._jobs.values()):
            if job.state is JobState.QUEUED:
                self._finish(job, JobState.CANCELLED, error=_error("the server is shutting down", "server"))
            elif job.state is JobState.RUNNING:
                self._request_stop(job, JobState.FAILED)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def add_listener(self, listener: Listener) -> None:
        """Call listener(event_type, job, data) for every later job event, on the event loop."""
        self._listeners.append(listener)

    # ---- submission ------------------------------------------------------------------------

    def submit(self, kind: str, work: Callable[..., Any], *, model_id: str | None = None,
               session_id: str | None = None, seq_id: int | None = None, ordered: bool = True,
               timeout_s: float | None = None) -> Job:
        """Queue `work(progress)` as a job and return its record at once.

        A retried submission with a seq_id already seen on this model returns the first job.
        Raises QueueFullError (429) past the per-model or per-server queue limit, except for a
        seq_id that queued jobs of its model are waiting for, because rejecting it would only stall them.
        """
        if model_id is not None:
            self._known_models.add(model_id)
        if model_id is not None and seq_id is not None and ordered:
            seen = self._by_seq.get((model_id, seq_id))
            if seen is not None:
                if seen.kind != kind:
                    raise ConflictError(f"seq_id {seq_id} of model {model_id} was already used by a {seen.kind} "
                                        f"request ({seen.id}); send this {kind} with the next seq_id",
                                        field="seq_id")
                return seen
            if not self._lane(model_id).fills_gap(seq_id):
                try:
                    self._check_capacity(model_id)
                except QueueFullError:
                    self._retry_expected.add((model_id, seq_id))
                    raise
        else:
            self._check_capacity(model_id if ordered else None)

        now = time.time()
        timeout_s = self.limits.job_timeout_s if timeout_s is None else timeout_s
        job = Job(id=str(uuid.uuid4()), kind=kind, model_id=model_id, session_id=session_id, seq_id=seq_id,
                  created_at=now, expires_at=now + timeout_s, work=work)
        job.updated_at = now
        self._jobs[job.id] = job
        if model_id is not None and ordered:
            if seq_id is not None:
                self._by_seq[(model_id, seq_id)] = job
            self._lane(model_id).add(job)
        else:
            self._free_queue.append(job)
        self._save(job)
        self._emit("job.queued", job, job.to_dict())
        logger.info("job %s queued: kind=%s model=%s seq=%s", job.id, kind, model_id, seq_id)

        assert self._loop is not None, "JobEngine.start() was not awaited"
        job.deadline_timer = self._loop.call_later(timeout_s, self._on_deadline, job.id)
        self._dispatch()
        return job

    def reject_seq(self, model_id: str, seq_id: int) -> None:
        """Mark a seq_id whose request was rejected, so later seq_ids of the model do not wait for it.

        A seq_id that submit() rejected for a full queue stays open, because the client sends it
        again; if it never does, the lane's gap timeout moves past it.
        """
        if (model_id, seq_id) in self._retry_expected:
            self._retry_expected.discard((model_id, seq_id))
            return
        if model_id not in self._known_models:
            return
        self._lane(model_id).consume(seq_id)
        self._dispatch()

    def _check_capacity(self, model_id: str | None) -> None:
        queued_total = sum(1 for job in self._jobs.values() if job.state is JobState.QUEUED)
        if queued_total >= self.limits.max_queued_total:
            raise QueueFullError(f"the server already has {queued_total} queued jobs; retry later",
                                 retry_after_s=2.0)
        if model_id is not None:
            queued = self._lane(model_id).queued_count()
            if queued >= self.limits.max_queued_per_model:
                raise QueueFullError(f"model {model_id} already has {queued} queued jobs; retry later",
                                     retry_after_s=1.0)

    def _lane(self, model_id: str) -> Lane:
        lane = self._lanes.get(model_id)
        if lane is None:
            lane = self._lanes[model_id] = Lane(model_id)
        return lane

    # ---- dispatch and execution ------------------------------------------------------------

    def _dispatch(self) -> None:
        for lane in self._lanes.values():
            job = lane.next_job(self.limits.seq_gap_timeout_s)
            if job is not None:
                lane.busy = True
                self._launch(job, lane)
            else:
                self._arm_gap_timer(lane)
        while self._free_queue:
            self._launch(self._free_queue.pop(0), None)

    def _arm_gap_timer(self, lane: Lane) -> None:
        """Wake the dispatcher when the lane's gap timeout ends; one timer per lane at most."""
        wait_s = lane.gap_wait_left_s(self.limits.seq_gap_timeout_s)
        if wait_s is None or lane.model_id in self._gap_timers or self._loop is None:
            return

        def on_gap_timeout() -> None:
            del self._gap_timers[lane.model_id]
            self._dispatch()

        # The extra millisecond keeps the timer from firing just before the gap timeout measured by the lane has passed.
        self._gap_timers[lane.model_id] = self._loop.call_later(wait_s + 0.001, on_gap_timeout)

    def _launch(self, job: Job, lane: Lane | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job, lane), name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job, lane: Lane | None) -> None:
        assert self._slots is not None and self._loop is not None
        try:
            async with self._slots:
                if job.is_terminal:  # cancelled or timed out while waiting for a slot
                    return
                self._mark_running(job)
                try:
                    result = await self._loop.run_in_executor(self._executor, self._call_work, job)
                except JobCancelledError:
                    self._finish_stopped(job)
                except TrainpulseError as exc:
                    logger.info("job %s failed: %s", job.id, exc.message)
                    self._finish(job, JobState.FAILED, error=_error(exc.message, exc.category))
                except Exception as exc:
                    logger.exception("job %s failed with an unexpected error", job.id)
                    self._finish(job, JobState.FAILED, error=_error(f"{type(exc).__name__}: {exc}", "server"))
                else:
                    # The work ran to its end, so its effect on the model is applied even when a cancel or
                    # the deadline came after its last progress call: report what happened.
                    self._finish(job, JobState.SUCCEEDED, result=result)
        except Exception as exc:
            # A fault in the bookkeeping itself must still end the job, or its waiters hang.
            logger.exception("job %s: internal error in the job engine", job.id)
            self._finish(job, JobState.FAILED, error=_error(f"internal error: {exc}", "server"))
        finally:
            if lane is not None:
                lane.busy = False
            self._running.discard(job)
            self._dispatch()

    def _mark_running(self, job: Job) -> None:
        now = time.time()
        job.state = JobState.RUNNING
        job.phase = Phase.STARTED
        job.started_at = now
        job.updated_at = now
        self._running.add(job)
        self._save(job)
        self._emit("job.started", job, {"state": job.state.value, "started_at": now})
        logger.info("job %s running after %.3f s queued", job.id, now - job.created_at)

    def _call_work(self, job: Job) -> Any:
        """Runs in a worker thread."""
        loop = self._loop
        assert loop is not None and job.work is not None

        def progress(phase: str, completed: int, total: int, metrics: dict[str, float] | None = None) -> None:
            if job.stop_flag.is_set():
                raise JobCancelledError(f"job {job.id} stopped at phase {phase!r}")
            loop.call_soon_threadsafe(self._on_progress, job, phase, completed, total, metrics)

        def publish_metrics(metrics: dict[str, float], step: float) -> None:
            # Unlike progress(), never raises: the work it reports has already been applied.
            loop.call_soon_threadsafe(self._on_metrics, job, metrics, step)

        progress.publish_metrics = publish_metrics
        try:
            return job.work(progress)
        finally:
            release_free_memory()

    def _on_progress(self, job: Job, phase: str, completed: int, total: int, metrics: dict[str, float] | None) -> None:
        if job.is_terminal:
            return
        now = time.time()
        if phase != job.phase:
            job.phase = phase
            self._emit("job.phase", job, {"phase": phase})
            # Saved on phase changes only: a record of a killed server then shows how far the job got.
            self._save(job)
        job.progress.completed = completed
        job.progress.total = total
        fraction = job.progress.fraction
        if job.started_at is not None and 0 < fraction < 1:
            job.progress.eta_s = (now - job.started_at) * (1 - fraction) / fraction
        elif fraction >= 1:
            job.progress.eta_s = 0.0
        job.touch()
        self._emit("job.progress", job, {"phase": phase, **job.progress.to_dict()})
        if metrics:
            self._on_metrics(job, metrics, completed)

    def _on_metrics(self, job: Job, metrics: dict[str, float], step: float) -> None:
        job.metrics.update(metrics)
        job.touch()
        self._emit("job.metrics", job, {"metrics": dict(metrics), "step": step})

    # ---- endings ---------------------------------------------------------------------------

    def _finish_stopped(self, job: Job) -> None:
        if job.stop_reason is JobState.TIMED_OUT:
            self._finish(job, JobState.TIMED_OUT, error=_timed_out_error(job))
        elif job.stop_reason is JobState.FAILED:
            self._finish(job, JobState.FAILED, error=_error(SHUTDOWN_MESSAGE, "server"))
        else:
            self._finish(job, JobState.CANCELLED, error=_error(f"job {job.id} was cancelled", "user"))

    def _finish(self, job: Job, state: JobState, *, result: Any = None, error: dict[str, str] | None = None) -> None:
        if job.is_terminal:
            return
        now = time.time()
        job.state = state
        job.result = result
        job.error = error
        job.finished_at = now
        job.updated_at = now
        job.work = None
        if job.deadline_timer is not None:
            job.deadline_timer.cancel()
            job.deadline_timer = None
        if state is JobState.SUCCEEDED:
            job.phase = Phase.DONE
            if job.progress.total:
                job.progress.completed = job.progress.total
            job.progress.eta_s = 0.0
        self._save(job)
        job.done.set()
        self._emit(f"job.{state.value}", job, job.to_dict())
        ran_s = now - job.started_at if job.started_at else 0.0
        logger.info("job %s %s after %.3f s running, %.3f s total", job.id, state.value, ran_s, now - job.created_at)

    # ---- queries and control ---------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Find a job in memory or, blocking on disk, in the store; use fetch() on the event loop."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        return self._get_stored(job_id)

    async def fetch(self, job_id: str) -> Job:
        """Find a job like get(), reading the store in a thread so the event loop never waits on disk."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job
        return await asyncio.to_thread(self._get_stored, job_id)

    def _get_stored(self, job_id: str) -> Job:
        if self._store is not None:
            if self._store.is_expired(job_id):
                raise NotFoundError(f"the result of request {job_id} expired after the "
                                    f"{self.limits.retention_s:.0f} s retention window", field="request_id")
            stored = self._store.load(job_id)
            if stored is not None:
                return stored
        raise NotFoundError(f"request {job_id} not found", field="request_id")

    async def wait(self, job_id: str, timeout_s: float) -> Job:
        """Wait up to timeout_s for the job to end and return its record, ended or not."""
        job = await self.fetch(job_id)
        if not job.is_terminal:
            try:
                await asyncio.wait_for(job.done.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a job; idempotent, and a no-op on a job that already ended."""
        job = self.get(job_id)
        if job.is_terminal:
            return job
        job.cancel_requested = True
        job.touch()
        if job.state is JobState.QUEUED:
            self._dequeue(job)
            self._finish(job, JobState.CANCELLED, error=_error(f"job {job.id} was cancelled while queued", "user"))
            self._dispatch()
        else:
            self._request_stop(job, JobState.CANCELLED)
            self._save(job)
            self._emit("job.progress", job, {"phase": job.phase, "cancel_requested": True, **job.progress.to_dict()})
        logger.info("job %s cancel requested in state %s", job.id, job.state.value)
        return job

    def cancel_queued_of_session(self, session_id: str, reason: str) -> int:
        count = 0
        for job in list(self._jobs.values()):
            if job.session_id == session_id and job.state is JobState.QUEUED:
                job.cancel_requested = True
                self._dequeue(job)
                self._finish(job, JobState.CANCELLED, error=_error(reason, "user"))
                count += 1
        if count:
            self._dispatch()
        return count

    def _dequeue(self, job: Job) -> None:
        if job in self._free_queue:
            self._free_queue.remove(job)
        elif job.model_id is not None and job.model_id in self._lanes:
            self._lanes[job.model_id].remove(job)

    def _on_deadline(self, job_id: str) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.is_terminal:
            return
        if job.state is JobState.QUEUED:
            self._dequeue(job)
            self._finish(job, JobState.TIMED_OUT, error=_timed_out_error(job))
            self._dispatch()
        else:
            self._request_stop(job, JobState.TIMED_OUT)
            self._save(job)
            logger.info("job %s passed its deadline while running; stopping at the next progress boundary",
                        job.id)

    @staticmethod
    def _request_stop(job: Job, reason: JobState) -> None:
        """Ask the worker thread to stop at its next progress call; the first reason given wins."""
        if job.stop_reason is None:
            job.stop_reason = reason
        job.stop_flag.set()

    def list_jobs(self, *, model_id: str | None = None, session_id: str | None = None,
                  states: set[str] | None = None, kind: str | None = None) -> list[Job]:
        jobs = [job for job in self._jobs.values()
                if (model_id is None or job.model_id == model_id)
                and (session_id is None or job.session_id == session_id)
                and (kind is None or job.kind == kind)
                and (not states or job.state.value in states)]
        jobs.sort(key=lambda job: job.created_at, reverse=True)
        return jobs

    def queue_position(self, job: Job) -> int | None:
        if job.state is not JobState.QUEUED:
            return None
        if job in self._free_queue:
            return self._free_queue.index(job)
        lane = self._lanes.get(job.model_id or "")
        if lane is None:
            return None
        order = lane.positions()
        return order.index(job) if job in order else None

    def counts_by_state(self) -> dict[str, int]:
        counts = {state.value: 0 for state in JobState}
        for job in self._jobs.values():
            counts[job.state.value] += 1
        return counts

    def queued_by_model(self) -> dict[str, int]:
        return {model_id: lane.queued_count() for model_id, lane in self._lanes.items()}

    # ---- retention -------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.limits.retention_s / 4))
            self.drop_expired()

    def drop_expired(self) -> list[str]:
        cutoff = time.time() - self.limits.retention_s
        expired = [job for job in self._jobs.values()
                   if job.state in TERMINAL_STATES and job.finished_at is not None and job.finished_at < cutoff]
        for job in expired:
            del self._jobs[job.id]
            if job.model_id is not None and job.seq_id is not None:
                self._by_seq.pop((job.model_id, job.seq_id), None)
        if expired and self._store is not None:
            self._store.mark_expired(job.id for job in expired)
        return [job.id for job in expired]

    # ---- plumbing --------------------------------------------------------------------------

    def _save(self, job: Job) -> None:
        if self._store is not None:
            self._store.save(job)

    def _emit(self, event_type: str, job: Job, data: dict[str, Any]) -> None:
        self._publish(event_type, data, job_id=job.id, model_id=job.model_id, session_id=job.session_id)
        for listener in self._listeners:
            try:
                listener(event_type, job, data)
            except Exception:
                # A broken observer (a metrics exporter, say) must not break job bookkeeping.
                logger.exception("job listener %r failed on %s for job %s", listener, event_type, job.id)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS after a job.

    Each worker thread allocates large tensors from its own glibc arena, and glibc keeps freed
    arena memory. Measured with SmolLM2, batch 8 x 100 tokens on 3 threads: 6.4 GB resident
    without this call, 1.2 GB with it. Elsewhere than glibc it does nothing.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - raises AttributeError outside glibc
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _error(message: str, category: str) -> dict[str, str]:
    return {"message": message, "category": category}


def _timed_out_error(job: Job) -> dict[str, str]:
    limit_s = (job.expires_at or job.created_at) - job.created_at
    return _error(f"job {job.id} timed out: it passed its {limit_s:.1f} s deadline", "user")
