"""Live event streams: Server-Sent Events responses and the WebSocket subscription protocol.

The handlers take the hub as an argument, and the route table binds them to paths. Every stream
unsubscribes when its client goes away and ends when the hub closes, because Hypercorn's
graceful shutdown waits for open responses instead of ending them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from quart import Response
from quart.wrappers.response import ResponseBody

from server.errors import UserError
from server.events.encoders import sse_comment, sse_frame, ws_json, ws_message
from server.events.hub import DEFAULT_DRAIN_TIMEOUT_S, EventHub, Subscription
from server.events.types import (
    TERMINAL_JOB_EVENTS,
    TYPE_PREFIX_SUFFIX,
    Event,
    EventFilter,
    EventType,
)

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 15.0  # well below nginx's default proxy_read_timeout of 60 s
MAX_SUBSCRIPTIONS_PER_SOCKET = 32
WS_CLOSE_GOING_AWAY = 1001  # RFC 6455 close code for a server that is shutting down

# Query parameter (and WebSocket filter key) -> EventFilter field.
FILTER_FIELDS = {"job": "job_ids", "model": "model_ids", "session": "session_ids", "types": "types"}
KNOWN_EVENT_TYPES = frozenset(event_type.value for event_type in EventType)


def parse_event_filter(args: Mapping[str, str]) -> EventFilter:
    """Build a filter from the query parameters `job`, `model`, `session` and `types`.

    Each contains comma-separated values and may be repeated. `types` takes event names or
    prefixes such as `job.*`. Raises UserError naming the parameter for an unknown type.
    """
    values = {name: _query_values(args, name) for name in FILTER_FIELDS}
    return _build_filter(values)


def parse_last_event_id(headers: Mapping[str, str], args: Mapping[str, str]) -> int | None:
    """Read the replay start from the `Last-Event-ID` header or the `last_event_id` parameter.

    EventSource sends the header when it reconnects, and the parameter serves clients that
    cannot set headers. Raises UserError naming the field when the value is not an id.
    """
    candidates = (
        ("Last-Event-ID", headers.get("Last-Event-ID")),
        ("last_event_id", args.get("last_event_id")),
    )
    for field, raw in candidates:
        if raw is not None and raw.strip():
            return _parse_event_id(raw.strip(), field)
    return None


async def sse_response(
    hub: EventHub,
    event_filter: EventFilter,
    last_event_id: int | None,
    *,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    end_on_terminal_job: str | None = None,
) -> Response:
    """Open a `text/event-stream` response of the events that match `event_filter`.

    With `last_event_id`, buffered events after that id come first, or a `resync` event when
    they are no longer buffered or the id comes from an earlier server run. A comment line goes out
    every `heartbeat_s` of silence, so proxies keep the connection open. With
    `end_on_terminal_job`, the stream ends after that job's terminal event.
    """
    # Subscribing here, before the response starts, means that every event published after the
    # client has the response headers reaches it.
    subscription = hub.subscribe(event_filter, since=last_event_id)
    frames = _sse_frames(subscription, heartbeat_s, end_on_terminal_job)
    response = Response(_EventStreamBody(frames, subscription), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # turns off nginx proxy buffering for it
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would otherwise cut the stream
    logger.debug("opened event stream (%s, since %s)", event_filter, last_event_id)
    return response


def sse_replay_response(events: list[Event]) -> Response:
    """Return a `text/event-stream` response that sends `events` and then ends.

    It serves streams whose last event is already known, so it needs no subscription.
    """
    frames = b"".join(sse_frame(event) for event in events)
    response = Response(frames, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    return response


async def websocket_session(hub: EventHub, websocket: Any) -> None:
    """Serve the WebSocket subscription protocol on Quart's `websocket` until it closes.

    Client messages: `{"op": "subscribe", "id", "filter", "since"}`,
    `{"op": "unsubscribe", "id"}` and `{"op": "ping"}`. The server acknowledges each and sends
    events as `{"op": "event", "subscription": <id>, "event": <envelope>}`. An invalid message
    gets `{"op": "error", "message", "field"}` and the socket stays open.
    """
    await _WebsocketSession(hub, websocket).run()


class _EventStreamBody(ResponseBody):
    """The SSE response body, which owns the subscription and ends it in every exit path.

    Quart calls __aexit__ only once it has started the body, and an async generator that never
    started would skip its `finally`. The finalizer covers a response that is dropped unsent.
    """

    def __init__(self, frames: AsyncGenerator[bytes, None], subscription: Subscription) -> None:
        self._frames = frames
        self._subscription = subscription
        weakref.finalize(self, subscription.close)

    async def __aenter__(self) -> _EventStreamBody:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._frames.aclose()
        finally:
            self._subscription.close()
            logger.debug("closed event stream (%s)", self._subscription.event_filter)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames


async def _sse_frames(
    subscription: Subscription, heartbeat_s: float, end_on_terminal_job: str | None
) -> AsyncGenerator[bytes, None]:
    try:
        while True:
            try:
                event = await subscription.next_event(heartbeat_s)
            except StopAsyncIteration:
                return  # stream.lagged or server.shutdown was the last frame
            if event is None:
                yield sse_comment("heartbeat")
                continue

            yield sse_frame(event)
            if (
                end_on_terminal_job is not None
                and event.job_id == end_on_terminal_job
                and event.type in TERMINAL_JOB_EVENTS
            ):
                return
    finally:
        # Also runs on CancelledError (client disconnect), which then propagates unchanged.
        subscription.close()


class _WebsocketSession:
    """The subscriptions of one WebSocket, each fed to the socket by its own task."""

    def __init__(self, hub: EventHub, websocket: Any) -> None:
        self._hub = hub
        self._websocket = websocket
        # Pumps and replies share the socket, so a lock keeps each message whole and in order.
        self._send_lock = asyncio.Lock()
        self._subscriptions: dict[str | int, tuple[Subscription, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        await self._websocket.accept()
        receiver = asyncio.ensure_future(self._receive_messages())
        hub_closed = asyncio.ensure_future(self._hub.wait_closed())
        try:
            done, _ = await asyncio.wait(
                {receiver, hub_closed}, return_when=asyncio.FIRST_COMPLETED
            )
            if receiver in done:
                receiver.result()  # re-raises why the receive loop stopped
                return
            await self._wait_pumps(DEFAULT_DRAIN_TIMEOUT_S)  # each sends server.shutdown first
            await self._websocket.close(WS_CLOSE_GOING_AWAY, "server shutdown")
        finally:
            receiver.cancel()
            hub_closed.cancel()
            pumps = []
            for subscription, pump in self._subscriptions.values():
                subscription.close()
                pump.cancel()
                pumps.append(pump)
            self._subscriptions.clear()
            await asyncio.gather(receiver, hub_closed, *pumps, return_exceptions=True)

    async def _receive_messages(self) -> None:
        while True:
            raw = await self._websocket.receive()
            reply = await self._handle_message(raw)
            if reply is not None:
                await self._send(ws_message(reply))

    async def _handle_message(self, raw: str | bytes) -> dict[str, Any] | None:
        if isinstance(raw, bytes):
            return _error_message("binary messages are not supported; send JSON text", None)
        try:
            message = json.loads(raw)
        except ValueError as error:
            return _error_message(f"invalid JSON message: {error}", None)
        if not isinstance(message, dict):
            return _error_message("expected a JSON object with an op field", "op")

        handlers = {"subscribe": self._subscribe, "unsubscribe": self._unsubscribe}
        op = message.get("op")
        try:
            if op == "ping":
                return {"op": "pong"}
            handler = handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise UserError(
                    f"unknown op {op!r}; expected subscribe, unsubscribe or ping", field="op"
                )
            return await handler(message)
        except UserError as error:
            logger.debug("rejected WebSocket message (%s): %s", error.field, error.message)
            reply = _error_message(error.message, error.field)
            if isinstance(message.get("id"), (str, int)):
                reply["id"] = message["id"]
            return reply

    async def _subscribe(self, message: dict[str, Any]) -> None:
        ref = _subscription_ref(message.get("id"))
        if ref in self._subscriptions:
            raise UserError(
                f"subscription id {ref!r} is already active; unsubscribe it first", field="id"
            )
        if len(self._subscriptions) >= MAX_SUBSCRIPTIONS_PER_SOCKET:
            raise UserError(
                f"a socket may hold at most {MAX_SUBSCRIPTIONS_PER_SOCKET} subscriptions; "
                "unsubscribe one first",
                field="id",
            )
        event_filter = _filter_from_json(message.get("filter"))
        since = _since_from_json(message.get("since"))

        subscription = self._hub.subscribe(event_filter, since=since)
        # The acknowledgement goes out before the pump starts, so it precedes the first event.
        ack = {"op": "subscribed", "id": ref, "last_event_id": subscription.start_id}
        try:
            await self._send(ws_message(ack))
        except BaseException:
            subscription.close()
            raise
        pump = asyncio.ensure_future(self._pump(ref, subscription))
        self._subscriptions[ref] = (subscription, pump)
        return None

    async def _unsubscribe(self, message: dict[str, Any]) -> dict[str, Any]:
        ref = _subscription_ref(message.get("id"))
        entry = self._subscriptions.pop(ref, None)
        if entry is None:
            raise UserError(f"no active subscription with id {ref!r}", field="id")
        subscription, pump = entry
        subscription.close()
        # The pump stops at its next event. Waiting for it means that no event of this
        # subscription follows the acknowledgement.
        await asyncio.gather(pump, return_exceptions=True)
        return {"op": "unsubscribed", "id": ref}

    async def _pump(self, ref: str | int, subscription: Subscription) -> None:
        try:
            async for event in subscription:
                await self._send(ws_json(event, ref))
        finally:
            subscription.close()
            entry = self._subscriptions.get(ref)
            if entry is not None and entry[0] is subscription:
                del self._subscriptions[ref]  # after lagged or shutdown the id is free again

    async def _wait_pumps(self, timeout_s: float) -> None:
        pumps = [pump for _, pump in self._subscriptions.values()]
        if pumps:
            await asyncio.wait(pumps, timeout=timeout_s)

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            await self._websocket.send(text)


def _query_values(args: Mapping[str, str], name: str) -> list[str]:
    getlist = getattr(args, "getlist", None)
    if getlist is not None:
        return list(getlist(name))
    value = args.get(name)
    return [] if value is None else [value]


def _build_filter(values: Mapping[str, list[str]]) -> EventFilter:
    fields: dict[str, frozenset[str]] = {}
    for name, attribute in FILTER_FIELDS.items():
        items = (item.strip() for value in values.get(name, []) for item in value.split(","))
        fields[attribute] = frozenset(item for item in items if item)
    for pattern in fields["types"]:
        _check_type_pattern(pattern)
    return EventFilter(**fields)


def _check_type_pattern(pattern: str) -> None:
    if pattern.endswith(TYPE_PREFIX_SUFFIX):
        prefix = pattern[:-1]
        if any(known.startswith(prefix) for known in KNOWN_EVENT_TYPES):
            return
    elif pattern in KNOWN_EVENT_TYPES:
        return
    raise UserError(
        f"unknown event type {pattern!r} in types; expected names such as job.failed "
        f"or prefixes such as job.* (known: {', '.join(sorted(KNOWN_EVENT_TYPES))})",
        field="types",
    )


def _parse_event_id(raw: str, field: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(
            f"invalid {field} {raw!r}: expected a non-negative integer event id", field=field
        )
    return value


def _filter_from_json(raw: Any) -> EventFilter:
    if raw is None:
        return EventFilter()
    if not isinstance(raw, dict):
        raise UserError(
            "filter must be a JSON object with job, model, session, types", field="filter"
        )
    unknown = sorted(set(raw) - set(FILTER_FIELDS))
    if unknown:
        raise UserError(
            f"unknown filter keys {unknown}; expected job, model, session, types", field="filter"
        )

    values: dict[str, list[str]] = {}
    for name, value in raw.items():
        items = [value] if isinstance(value, str) else value
        if items is None:
            items = []
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise UserError(
                f"filter.{name} must be a string or a list of strings", field=f"filter.{name}"
            )
        values[name] = items
    return _build_filter(values)


def _since_from_json(raw: Any) -> int | None:
    if raw is None:
        return None
    # bool is an int subclass, but `true` is no event id.
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise UserError(
            f"invalid since {raw!r}: expected a non-negative integer event id", field="since"
        )
    return raw


def _subscription_ref(raw: Any) -> str | int:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise UserError("id must be a string or an integer that names the subscription", field="id")
    return raw


def _error_message(message: str, field: str | None) -> dict[str, Any]:
    return {"op": "error", "message": message, "field": field}
