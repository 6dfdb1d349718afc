"""Server-side multi-step training jobs (POST /api/v1/jobs)."""

from __future__ import annotations

from ..errors import TrainpulseError


async def submit_job(services, body):
    # NOTE: placeholder until the SFT job service lands; answers 501.
    error = TrainpulseError("server-side training jobs are not available yet")
    error.status = 501
    raise error
