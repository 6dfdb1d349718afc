"""Turn the endpoint table into Quart routes: auth, body parsing, handler call, response."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, ValidationError
from quart import Quart, Response, current_app, jsonify, request, websocket

from ..errors import TrainpulseError, UserError
from ..jobs.record import Job

API_PREFIX = "/api/v1"
PUBLIC_ENDPOINTS = frozenset({"healthz"})  # health probes carry no key

Handler = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str  # GET, POST, DELETE, or WEBSOCKET
    path: str  # relative to /api/v1 unless it starts with "!", which marks an absolute path
    handler: Handler  # handler(services, body, **path_params)
    schema: type[BaseModel] | None = None
    aliases: tuple[str, ...] = ()  # extra absolute paths that reach the same handler
    job: bool = False  # the handler returns a Job, and the response is the future {request_id}
    ordered: bool = False  # a rejected request still consumes its seq_id in the model's lane

    def paths(self) -> list[str]:
        main = self.path[1:] if self.path.startswith("!") else API_PREFIX + self.path
        return [main, *self.aliases]


class AuthError(TrainpulseError):
    status = 401
    category = "user"


def services():
    return current_app.extensions["trainpulse"]


def check_api_key(headers, args) -> None:
    expected = services().settings.api_key
    if not expected:
        return
    given = headers.get("X-API-Key") or args.get("api_key") or ""
    authorization = headers.get("Authorization", "")
    if not given and authorization.lower().startswith("bearer "):
        given = authorization[7:]
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AuthError("missing or invalid API key: send it in the X-API-Key header", field="X-API-Key")


async def _read_json(schema: type[BaseModel] | None) -> Any:
    if schema is None:
        return None
    raw_bytes = await request.get_data()
    if not raw_bytes.strip():
        return {}
    try:
        raw = json.loads(raw_bytes, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise UserError(f"the request body is not valid UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise UserError("the request body is nested too deeply") from None
    if not isinstance(raw, dict):
        raise UserError("the request body must be a JSON object")
    return raw


def _reject_constant(name: str) -> Any:
    raise UserError(f"the request body contains {name}, which is not valid JSON; send finite numbers")


def _make_view(endpoint: Endpoint):
    async def view(**params):
        if endpoint.name not in PUBLIC_ENDPOINTS:
            check_api_key(request.headers, request.args)
        raw = await _read_json(endpoint.schema)
        try:
            body = endpoint.schema.model_validate(raw) if endpoint.schema is not None else None
            result = await endpoint.handler(services(), body, **params)
        except (TrainpulseError, ValidationError) as exc:
            # The SDK gives up after a 400 or 404, so that seq_id will never come back. It resends
            # after a 408, 409, 429 or 5xx, so those seq_ids keep their place in the lane.
            if endpoint.ordered and getattr(exc, "status", 400) in (400, 404):
                _release_seq(raw)
            raise
        if isinstance(result, Response):
            return result
        if isinstance(result, Job):
            return jsonify({"request_id": result.id, "model_id": result.model_id})
        return jsonify(result)

    view.__name__ = f"endpoint_{endpoint.name}"
    return view


def _make_websocket_view(endpoint: Endpoint):
    async def view(**params):
        check_api_key(websocket.headers, websocket.args)
        await endpoint.handler(services(), None, **params)

    view.__name__ = f"endpoint_{endpoint.name}"
    return view


def _release_seq(raw: Any) -> None:
    if isinstance(raw, dict) and isinstance(raw.get("model_id"), str) and isinstance(raw.get("seq_id"), int):
        services().jobs.reject_seq(raw["model_id"], raw["seq_id"])


def register(app: Quart, endpoints: list[Endpoint]) -> None:
    names = set()
    for endpoint in endpoints:
        if endpoint.name in names:
            raise ValueError(f"duplicate endpoint name {endpoint.name}")
        names.add(endpoint.name)
        if endpoint.method == "WEBSOCKET":
            view = _make_websocket_view(endpoint)
            for path in endpoint.paths():
                app.add_websocket(path, endpoint=f"{endpoint.name}:{path}", view_func=view)
            continue
        view = _make_view(endpoint)
        for path in endpoint.paths():
            app.add_url_rule(path, endpoint=f"{endpoint.name}:{path}", view_func=view, methods=[endpoint.method])
