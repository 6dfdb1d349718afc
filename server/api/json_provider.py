"""JSON responses that stay valid JSON: NaN and infinity become null.

A diverged loss is NaN, and Python's json module would write it as a bare `NaN` token that
browsers and strict parsers reject.
"""

from __future__ import annotations

import json
import math
from typing import Any

from quart.json.provider import DefaultJSONProvider


def finite_or_null(value: Any) -> Any:
    """Copy a JSON-like structure with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


class FiniteJSONProvider(DefaultJSONProvider):
    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("default", self.default)
        kwargs.setdefault("ensure_ascii", self.ensure_ascii)
        kwargs.setdefault("sort_keys", self.sort_keys)
        try:
            # The common case pays for one pass only; the copy is made only when a value is not finite.
            return json.dumps(obj, allow_nan=False, **kwargs)
        except ValueError:
            return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)
