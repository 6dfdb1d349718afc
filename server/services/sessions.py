"""Client sessions: created by every ServiceClient, kept alive by heartbeats."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConflictError, NotFoundError


@dataclass
class Session:
    id: str
    tags: list[str]
    user_metadata: dict[str, Any] | None
    sdk_version: str | None
    created_at: float
    last_heartbeat_at: float
    finished_at: float | None = None
    model_ids: list[str] = field(default_factory=list)
    stale: bool = False  # heartbeats stopped; its queued work was cancelled

    def to_dict(self) -> dict[str, Any]:
        return {"session_id": self.id, "tags": self.tags, "user_metadata": self.user_metadata,
                "sdk_version": self.sdk_version, "created_at": self.created_at,
                "last_heartbeat_at": self.last_heartbeat_at, "finished_at": self.finished_at,
                "model_ids": list(self.model_ids)}


class SessionService:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def create(self, tags: list[str], user_metadata: dict[str, Any] | None, sdk_version: str | None) -> Session:
        now = time.time()
        session = Session(id=f"session-{uuid.uuid4().hex[:16]}", tags=tags, user_metadata=user_metadata,
                          sdk_version=sdk_version, created_at=now, last_heartbeat_at=now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"session {session_id} not found; create one with create_session", field="session_id")
        return session

    def get_open(self, session_id: str) -> Session:
        """Return a session that can still take new models and samplers."""
        session = self.get(session_id)
        if session.finished_at is not None:
            raise ConflictError(f"session {session_id} was finished; create a new session", field="session_id")
        return session

    def heartbeat(self, session_id: str) -> Session:
        session = self.get(session_id)
        session.last_heartbeat_at = time.time()
        session.stale = False
        return session

    def finish(self, session_id: str) -> Session:
        """Finish a session; finishing it again keeps the first finish time."""
        session = self.get(session_id)
        if session.finished_at is None:
            session.finished_at = time.time()
        return session

    def all(self) -> list[Session]:
        return list(self._sessions.values())

    def stale_sessions(self, timeout_s: float) -> list[Session]:
        """Sessions whose heartbeats stopped more than timeout_s ago and were not yet reported."""
        cutoff = time.time() - timeout_s
        found = [s for s in self._sessions.values()
                 if not s.stale and s.finished_at is None and s.last_heartbeat_at < cutoff]
        for session in found:
            session.stale = True
        return found
