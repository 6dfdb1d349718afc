"""Wire encodings of the event envelope: Server-Sent Events frames and WebSocket messages."""

from __future__ import annotations

import json
import math
from typing import Any

from server.events.types import Event


def event_json(event: Event) -> str:
    """Encode the envelope as one line of strict JSON.

    NaN and infinite floats (a diverged loss, say) become null, because browsers'
    JSON.parse rejects the bare NaN that Python's json module writes by default.
    """
    envelope = event.to_dict()
    try:
        return _dumps(envelope)
    except ValueError:
        return _dumps(_replace_non_finite(envelope))


def sse_frame(event: Event) -> bytes:
    """Encode one SSE message with the event id and the envelope as its data.

    The frame has no `event:` field because EventSource.onmessage fires only for unnamed
    messages; clients read the type from the envelope. json.dumps escapes newlines, so the
    data is always a single `data:` line.
    """
    return f"id: {event.id}\ndata: {event_json(event)}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """Encode an SSE comment line, which clients ignore; used as a heartbeat."""
    single_line = " ".join(text.splitlines())
    return f": {single_line}\n\n".encode()


def ws_json(event: Event, subscription: str | int) -> str:
    """Encode the WebSocket message that carries one event of the client's subscription."""
    return f'{{"op":"event","subscription":{_dumps(subscription)},"event":{event_json(event)}}}'


def ws_message(message: dict[str, Any]) -> str:
    """Encode a WebSocket control message (acknowledgement, pong or error)."""
    return _dumps(message)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _replace_non_finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _replace_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_non_finite(item) for item in value]
    return value
