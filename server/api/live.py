"""Live event routes: the multiplexed SSE stream, one job's SSE stream, and the WebSocket."""

from __future__ import annotations

from quart import Response, request, websocket

from ..events.types import EventFilter
from .streams import parse_event_filter, parse_last_event_id, sse_response, websocket_session


async def events(services, body) -> Response:
    return await sse_response(services.hub, parse_event_filter(request.args),
                              parse_last_event_id(request.headers, request.args))


async def job_events(services, body, job_id: str) -> Response:
    """Stream one job from its first event to its terminal event, then end the stream."""
    job = services.jobs.get(job_id)
    last_event_id = parse_last_event_id(request.headers, request.args)
    if job.is_terminal and last_event_id is not None:
        # A reconnect after the terminal event: 204 tells EventSource to stop reconnecting.
        return Response("", status=204)
    event_filter = EventFilter(job_ids=frozenset({job_id}))
    # Replay from the start of the buffer so a late subscriber still sees the job's whole history.
    # NOTE: a job whose events have left the ring buffer starts with a `resync` event instead.
    since = last_event_id if last_event_id is not None else 0
    return await sse_response(services.hub, event_filter, since, end_on_terminal_job=job_id)


async def events_websocket(services, body) -> None:
    await websocket_session(services.hub, websocket._get_current_object())
