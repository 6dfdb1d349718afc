"""The one place where exceptions become HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from quart import Quart, has_request_context, has_websocket_context, jsonify, request, websocket
from werkzeug.exceptions import HTTPException

from ..errors import ConflictError, QueueFullError, TrainpulseError

logger = logging.getLogger(__name__)


def error_body(message: str, category: str, status: int, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "category": category, "status": status}
    if field:
        body["field"] = field
    return body


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first.get("loc", ())) or None
    message = f"invalid field {field}: {first.get('msg')}" if field else f"invalid request: {first.get('msg')}"
    body = error_body(message, "user", 400, field)
    body["details"] = [{"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")}
                       for e in exc.errors()[:20]]
    return body


def _method_and_path() -> tuple[str, str]:
    """Name the failing request for the log; a WebSocket handshake has no HTTP request object."""
    if has_request_context():
        return request.method, request.path
    if has_websocket_context():
        return "WEBSOCKET", websocket.path
    return "-", "-"


def install(app: Quart) -> None:
    @app.errorhandler(TrainpulseError)
    async def _trainpulse_error(exc: TrainpulseError):
        logger.info("%s %s -> %d: %s", *_method_and_path(), exc.status, exc.message)
        response = jsonify(error_body(exc.message, exc.category, exc.status, exc.field))
        response.status_code = exc.status
        if isinstance(exc, QueueFullError):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, ConflictError):
            # Stops the SDK's HTTP-level retries of a 409 that never clears (a reused seq_id). Its
            # outer retry loop still retries every 409, which is why lost models return 410.
            response.headers["x-should-retry"] = "false"
        return response

    @app.errorhandler(ValidationError)
    async def _validation_error(exc: ValidationError):
        body = validation_error_body(exc)
        logger.info("%s %s -> 400: %s", *_method_and_path(), body["error"])
        response = jsonify(body)
        response.status_code = 400
        return response

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException):
        code = exc.code or 500
        if code == 404:
            message = f"no route for {request.method} {request.path}"
        elif code == 405:
            message = f"method {request.method} is not allowed on {request.path}"
        else:
            message = exc.description or exc.name
        response = jsonify(error_body(message, "user" if code < 500 else "server", code))
        response.status_code = code
        return response

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception):
        logger.exception("unexpected error on %s %s", *_method_and_path())
        response = jsonify(error_body(f"internal server error: {type(exc).__name__}: {exc}", "server", 500))
        response.status_code = 500
        return response
