"""Handshake and housekeeping routes: health, client config, capabilities, telemetry."""

from __future__ import annotations

import time


async def healthz(services, body) -> dict:
    return {"status": "ok"}


async def client_config(services, body) -> dict:
    # An empty config means: JSON transport, no gRPC; the SDK fills in its own defaults.
    return {}


async def server_capabilities(services, body) -> dict:
    return {"supported_models": [{"model_name": name} for name in services.settings.models]}


async def telemetry(services, body) -> dict:
    return {"status": "accepted"}


async def status(services, body) -> dict:
    counts = services.jobs.counts_by_state()
    return {
        "status": "ok",
        "uptime_s": round(time.time() - services.jobs.started_at, 3),
        "models_loaded": sum(1 for model in services.models.all()
                             if not (model.unloaded or model.restored or model.failure)),
        "jobs": counts,
        "jobs_running": counts["running"],
        "jobs_queued": counts["queued"],
        "subscribers": services.hub.subscriber_count if services.hub is not None else 0,
        "catalogue": list(services.settings.models),
    }
