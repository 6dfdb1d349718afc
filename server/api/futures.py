"""retrieve_future (long-polling) and cancel_future."""

from __future__ import annotations

from quart import jsonify

from . import presenters


async def retrieve_future(services, body):
    job = await services.jobs.wait(body.request_id, services.settings.long_poll_s)
    answer, status = presenters.future_outcome(job)
    response = jsonify(answer)
    response.status_code = status
    return response


async def cancel_future(services, body) -> dict:
    job = services.jobs.cancel(body.request_id)
    return presenters.job_record(job, services.jobs.queue_position(job))
