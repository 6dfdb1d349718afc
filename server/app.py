"""create_app(settings): build the services, the event hub and the job engine, and register routes."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quart import Quart, send_from_directory

from .api import errors as api_errors
from .api import prometheus
from .api.endpoints import ENDPOINTS
from .api.json_provider import FiniteJSONProvider
from .api.registrar import register
from .config import Settings
from .engine.backend import Backend
from .engine.catalogue import Catalogue
from .events.hub import EventHub
from .jobs.engine import JobEngine, JobLimits
from .jobs.store import SqliteJobStore
from .services.checkpoints import CheckpointService
from .services.metrics import MetricHistory
from .services.models import ModelService
from .services.sampling import SamplingService
from .services.sessions import SessionService
from .services.sft import SftService

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@dataclass
class Services:
    settings: Settings
    hub: EventHub
    jobs: JobEngine
    catalogue: Catalogue
    backend: Backend
    sessions: SessionService
    checkpoints: CheckpointService
    models: ModelService
    sampling: SamplingService
    history: MetricHistory
    background: set[asyncio.Task]
    store: SqliteJobStore | None = None
    sft: SftService | None = None


def build_services(settings: Settings, backend: Backend | None = None) -> Services:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteJobStore(settings.database_path, retention_s=settings.retention_s)
    hub = EventHub(ring_size=settings.event_ring_size, queue_size=settings.event_queue_size)
    jobs = JobEngine(JobLimits(workers=settings.worker_threads, job_timeout_s=settings.job_timeout_s,
                               retention_s=settings.retention_s, seq_gap_timeout_s=settings.seq_gap_timeout_s,
                               max_queued_per_model=settings.max_queued_per_model,
                               max_queued_total=settings.max_queued_total),
                     publish=hub.publish, store=store)
    catalogue = Catalogue(settings.model_cache_dir)
    if backend is None:
        from .engine.torch_backend import TorchBackend

        backend = TorchBackend(catalogue.resolve, micro_batch_tokens=settings.micro_batch_tokens)
    sessions = SessionService()
    checkpoints = CheckpointService(settings.checkpoint_dir)
    names = list(settings.models)
    history = MetricHistory()
    models = ModelService(backend, jobs, checkpoints, sessions, hub.publish, names, history, store=store)
    sampling = SamplingService(backend, jobs, checkpoints, names, sessions)
    sft = SftService(backend, jobs, models, checkpoints, history, hub.publish_threadsafe, settings.resolved_data_dir)
    services = Services(settings, hub, jobs, catalogue, backend, sessions, checkpoints, models, sampling, history,
                        set(), store, sft)
    # Count job endings from boot, not from the first scrape.
    prometheus.exporter_for(services)
    return services


def create_app(settings: Settings, backend: Backend | None = None) -> Quart:
    app = Quart(__name__, static_folder=None)
    app.json = FiniteJSONProvider(app)
    services = build_services(settings, backend)
    app.extensions["trainpulse"] = services
    api_errors.install(app)
    register(app, ENDPOINTS)

    @app.route("/")
    async def dashboard():
        return await send_from_directory(STATIC_DIR, "index.html")

    @app.route("/static/<path:filename>")
    async def static_file(filename: str):
        return await send_from_directory(STATIC_DIR, filename)

    @app.before_serving
    async def start() -> None:
        services.hub.bind_loop()
        await _open_store(services)
        await services.jobs.start()
        task = asyncio.create_task(_watch_sessions(services), name="trainpulse-session-watch")
        services.background.add(task)
        logger.info("trainpulse ready: storage %s, models %s", settings.storage_dir, ", ".join(settings.models))

    @app.after_serving
    async def stop() -> None:
        for task in services.background:
            task.cancel()
        await services.hub.close()
        await services.jobs.stop()
        if services.store is not None:
            await asyncio.to_thread(services.store.close)
        logger.info("trainpulse stopped")

    return app


async def _open_store(services: Services) -> None:
    """Open the database, fail the jobs the previous process left unfinished, restore its models."""
    if services.store is None:
        return
    started = time.perf_counter()
    recovered = await asyncio.to_thread(services.store.open)
    restored = await asyncio.to_thread(services.models.restore)
    logger.info("store %s opened in %.3f s: %d unfinished jobs of the previous run marked failed, "
                "%d models restored as not loaded", services.store.path, time.perf_counter() - started, recovered,
                restored)


async def _watch_sessions(services: Services) -> None:
    """Cancel the queued work of sessions whose heartbeats stopped."""
    timeout_s = services.settings.session_timeout_s
    while True:
        await asyncio.sleep(min(5.0, timeout_s / 4))
        for session in services.sessions.stale_sessions(timeout_s):
            cancelled = services.jobs.cancel_queued_of_session(
                session.id, f"session {session.id} sent no heartbeat for {timeout_s:.0f} s; its queued work was cancelled")
            logger.warning("session %s: no heartbeat for %.0f s, %d queued jobs cancelled", session.id, timeout_s,
                           cancelled)


def services_of(app: Quart) -> Any:
    return app.extensions["trainpulse"]
