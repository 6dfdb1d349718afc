"""Live event routes: the multiplexed SSE stream, one job's SSE stream, and the WebSocket."""

from __future__ import annotations

from quart import Response, request, websocket

from ..events.types import TERMINAL_JOB_EVENTS, Event, EventFilter
from ..jobs.record import Job
from .streams import (
    parse_event_filter,
    parse_last_event_id,
    sse_replay_response,
    sse_response,
    websocket_session,
)


async def events(services, body) -> Response:
    return await sse_response(services.hub, parse_event_filter(request.args),
                              parse_last_event_id(request.headers, request.args))


async def job_events(services, body, job_id: str) -> Response:
    """Stream one job from its first event to its terminal event, then end the stream.

    A finished job's stream sends the job's events still in the ring buffer and ends at once.
    When its terminal event has left the buffer (or the job was loaded from storage after a
    restart), a terminal event rebuilt from the job record ends the stream instead. That event
    carries the hub's latest id, so a reconnect with it gets the 204 below.
    """
    job = await services.jobs.fetch(job_id)
    last_event_id = parse_last_event_id(request.headers, request.args)
    if job.is_terminal and last_event_id is not None:
        # A reconnect after the terminal event: 204 tells EventSource to stop reconnecting.
        return Response("", status=204)

    event_filter = EventFilter(job_ids=frozenset({job_id}))
    if job.is_terminal:
        return sse_replay_response(_finished_job_events(services.hub, job, event_filter))

    # Replay from the start of the buffer so a late subscriber still sees the job's whole history.
    # NOTE: a job whose events have left the ring buffer starts with a `resync` event instead.
    since = last_event_id if last_event_id is not None else 0
    return await sse_response(services.hub, event_filter, since, end_on_terminal_job=job_id)


async def events_websocket(services, body) -> None:
    await websocket_session(services.hub, websocket._get_current_object())


def _finished_job_events(hub, job: Job, event_filter: EventFilter) -> list[Event]:
    events = hub.buffered_events(event_filter)
    if events and events[-1].type in TERMINAL_JOB_EVENTS:
        return events
    terminal = Event(hub.last_event_id, f"job.{job.state.value}", job.finished_at or job.updated_at,
                     job.id, job.model_id, job.session_id, job.to_dict())
    return [*events, terminal]
