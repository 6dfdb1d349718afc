"""The job API: one job, a filtered page of jobs, cancel."""

from __future__ import annotations

import asyncio

from quart import request

from ..errors import UserError
from ..jobs.states import JobState
from . import presenters

MAX_PAGE = 500


async def get_job(services, body, job_id: str) -> dict:
    job = await services.jobs.fetch(job_id)
    return presenters.job_record(job, services.jobs.queue_position(job))


async def cancel_job(services, body, job_id: str) -> dict:
    job = services.jobs.cancel(job_id)
    return presenters.job_record(job, services.jobs.queue_position(job))


async def list_jobs(services, body) -> dict:
    args = request.args
    states = {part for part in args.get("state", "").split(",") if part}
    unknown = states - {state.value for state in JobState}
    if unknown:
        raise UserError(f"unknown state {sorted(unknown)[0]!r}; use one of "
                        f"{', '.join(state.value for state in JobState)}", field="state")
    limit = _int_arg(args, "limit", 50, 1, MAX_PAGE)
    offset = _int_arg(args, "offset", 0, 0, 10**9)
    filters = {"model_id": args.get("model") or None, "session_id": args.get("session") or None,
               "states": states, "kind": args.get("kind") or None}
    jobs = services.jobs.list_jobs(**filters)
    if services.store is not None:
        # Jobs of earlier server runs live only in the database until their retention ends.
        in_memory = {job.id for job in jobs}
        stored = await asyncio.to_thread(services.store.list_jobs, limit=offset + limit, **filters)
        jobs = sorted([*jobs, *(job for job in stored if job.id not in in_memory)],
                      key=lambda job: job.created_at, reverse=True)
    page = jobs[offset:offset + limit]
    return {"jobs": [presenters.job_record(job, services.jobs.queue_position(job)) for job in page],
            "total": len(jobs), "limit": limit, "offset": offset}


def _int_arg(args, name: str, default: int, low: int, high: int) -> int:
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"invalid {name} {raw!r}: expected an integer", field=name) from None
    if not low <= value <= high:
        raise UserError(f"invalid {name} {value}: expected {low}-{high}", field=name)
    return value
