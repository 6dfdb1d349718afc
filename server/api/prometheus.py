"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from quart import Response


async def metrics(services, body) -> Response:
    # NOTE: placeholder until the Prometheus exporter lands.
    return Response("", status=501, content_type="text/plain")
