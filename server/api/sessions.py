"""Session routes: create_session, heartbeats, finish."""

from __future__ import annotations


async def create_session(services, body) -> dict:
    session = services.sessions.create(body.tags, body.user_metadata, body.sdk_version)
    return {"type": "create_session", "session_id": session.id}


async def heartbeat(services, body) -> dict:
    services.sessions.heartbeat(body.session_id)
    return {"type": "session_heartbeat"}


async def finish(services, body, session_id: str) -> dict:
    return services.sessions.finish(session_id).to_dict()


async def get_session(services, body, session_id: str) -> dict:
    return services.sessions.get(session_id).to_dict()


async def list_sessions(services, body) -> dict:
    return {"sessions": [session.to_dict() for session in services.sessions.all()]}
