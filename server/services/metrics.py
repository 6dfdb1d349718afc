"""Per-model metric history, downsampled for charts.

Training jobs record one point per step and metric (loss, learning rate, grad norm, tokens/s).
A chart first loads the history through GET /api/v1/models/{id}/metrics, then appends the live
`job.metrics` events.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from ..errors import NotFoundError, UserError

MAX_POINTS_PER_SERIES = 100_000  # oldest points are dropped beyond this


class MetricHistory:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # worker threads record while the loop reads
        self._series: dict[str, dict[str, list[tuple[float, float, float]]]] = defaultdict(dict)

    def record(self, model_id: str, step: float, metrics: dict[str, float], at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._lock:
            series = self._series[model_id]
            for name, value in metrics.items():
                points = series.setdefault(name, [])
                points.append((float(step), at, float(value)))
                if len(points) > MAX_POINTS_PER_SERIES:
                    del points[: len(points) - MAX_POINTS_PER_SERIES]

    def names(self, model_id: str) -> list[str]:
        with self._lock:
            return sorted(self._series.get(model_id, {}))

    def series(self, model_id: str, name: str, max_points: int) -> dict[str, Any]:
        """Return the history of one metric in at most max_points buckets, each with min, max and mean."""
        if max_points < 1:
            raise UserError(f"invalid max_points {max_points}: expected at least 1", field="max_points")
        with self._lock:
            known = self._series.get(model_id, {})
            if name not in known:
                raise NotFoundError(f"model {model_id} has no metric {name!r}; it has: "
                                    f"{', '.join(sorted(known)) or 'none yet'}", field="name")
            points = list(known[name])
        return {"model_id": model_id, "name": name, "count": len(points), "points": _downsample(points, max_points),
                "last": _point(points[-1]) if points else None}


def _point(point: tuple[float, float, float]) -> dict[str, float]:
    step, at, value = point
    return {"step": step, "time": at, "value": value}


def _downsample(points: list[tuple[float, float, float]], max_points: int) -> list[dict[str, float]]:
    if len(points) <= max_points:
        return [{**_point(p), "min": p[2], "max": p[2]} for p in points]
    buckets = []
    size = len(points) / max_points
    for index in range(max_points):
        chunk = points[int(index * size): int((index + 1) * size)] or [points[min(len(points) - 1, int(index * size))]]
        values = [p[2] for p in chunk]
        last = chunk[-1]
        buckets.append({"step": last[0], "time": last[1], "value": sum(values) / len(values),
                        "min": min(values), "max": max(values)})
    return buckets
