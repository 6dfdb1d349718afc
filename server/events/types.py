"""The event envelope, the event type names and the subscriber filter.

Every transport (SSE and WebSocket) carries the same envelope:
`{id, type, time, job_id, model_id, session_id, data}`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class EventType(str, enum.Enum):
    """Dotted event names, sent on the wire unchanged."""

    JOB_QUEUED = "job.queued"
    JOB_STARTED = "job.started"
    JOB_PHASE = "job.phase"
    # The hub coalesces progress and metrics per job (by default to 10 per second each), and
    # the latest one always goes out.
    JOB_PROGRESS = "job.progress"
    JOB_METRICS = "job.metrics"
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELLED = "job.cancelled"
    JOB_TIMED_OUT = "job.timed_out"
    MODEL_CREATED = "model.created"
    MODEL_UNLOADED = "model.unloaded"
    CHECKPOINT_SAVED = "checkpoint.saved"
    # Sent to every subscriber, whatever its filter, as its last event when the server stops.
    SERVER_SHUTDOWN = "server.shutdown"
    # The last event of a subscriber whose queue overflowed. The hub then drops it.
    STREAM_LAGGED = "stream.lagged"
    # The requested replay start is older than the ring buffer, or newer than the last id because it
    # comes from an earlier server run. Either way the client reloads state through REST.
    RESYNC = "resync"

    def __str__(self) -> str:
        return self.value


TERMINAL_JOB_EVENTS: frozenset[str] = frozenset(
    {
        EventType.JOB_SUCCEEDED.value,
        EventType.JOB_FAILED.value,
        EventType.JOB_CANCELLED.value,
        EventType.JOB_TIMED_OUT.value,
    }
)

COALESCED_EVENTS: frozenset[str] = frozenset(
    {EventType.JOB_PROGRESS.value, EventType.JOB_METRICS.value}
)

# Events that the hub sends to single subscribers, whatever their filter, outside the ring
# buffer and the id sequence. Each carries the id of the last event its subscriber was sent, so
# a client that reconnects with that id as Last-Event-ID resumes without a gap.
CONTROL_EVENTS: frozenset[str] = frozenset(
    {EventType.STREAM_LAGGED.value, EventType.RESYNC.value, EventType.SERVER_SHUTDOWN.value}
)

TYPE_PREFIX_SUFFIX = ".*"


@dataclass(frozen=True)
class Event:
    """One published event. `id` increases by one per event across the server, from 1."""

    id: int
    type: str
    time: float  # unix seconds
    job_id: str | None = None
    model_id: str | None = None
    session_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "time": self.time,
            "job_id": self.job_id,
            "model_id": self.model_id,
            "session_id": self.session_id,
            "data": self.data,
        }


@dataclass(frozen=True)
class EventFilter:
    """Which events a subscriber wants. An empty set means any value.

    `types` contains exact names (`job.failed`) and prefixes written as `job.*`, which match every
    type that starts with `job.`. The sets are combined with AND.
    """

    job_ids: frozenset[str] = frozenset()
    model_ids: frozenset[str] = frozenset()
    session_ids: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    _type_prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # "job.*" keeps its dot, so it matches "job.failed" but not "jobs.x".
        prefixes = tuple(
            pattern[:-1] for pattern in self.types if pattern.endswith(TYPE_PREFIX_SUFFIX)
        )
        object.__setattr__(self, "_type_prefixes", prefixes)

    def __str__(self) -> str:
        parts = [
            f"{name}={','.join(sorted(values))}"
            for name, values in (
                ("job", self.job_ids),
                ("model", self.model_ids),
                ("session", self.session_ids),
                ("types", self.types),
            )
            if values
        ]
        return " ".join(parts) or "all events"

    def matches(self, event: Event) -> bool:
        if self.job_ids and event.job_id not in self.job_ids:
            return False
        if self.model_ids and event.model_id not in self.model_ids:
            return False
        if self.session_ids and event.session_id not in self.session_ids:
            return False
        if self.types and not self._matches_type(event.type):
            return False
        return True

    def _matches_type(self, event_type: str) -> bool:
        if event_type in self.types:
            return True
        return any(event_type.startswith(prefix) for prefix in self._type_prefixes)
