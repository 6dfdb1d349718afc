"""tinker:// checkpoint paths and where they live on disk.

A path names a model's checkpoint: `tinker://<model_id>/weights/<name>` (adapter and optimizer,
for load_weights) or `tinker://<model_id>/sampler_weights/<name>` (adapter only, for sampling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class CheckpointPath:
    model_id: str
    kind: str  # "weights" or "sampler_weights"
    name: str

    def uri(self) -> str:
        return f"{SCHEME}{self.model_id}/{self.kind}/{self.name}"

    def directory(self, root: Path) -> Path:
        return root / self.model_id / self.kind / self.name


def check_name(name: str, field: str = "path") -> str:
    if not _NAME.match(name):
        raise UserError(f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit", field=field)
    return name


def parse(uri: str, field: str = "path") -> CheckpointPath:
    if not uri.startswith(SCHEME):
        raise UserError(f"invalid checkpoint path {uri!r}: expected tinker://<model_id>/<weights|sampler_weights>/<name>",
                        field=field)
    parts = uri[len(SCHEME):].strip("/").split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise UserError(f"invalid checkpoint path {uri!r}: expected tinker://<model_id>/<weights|sampler_weights>/<name>",
                        field=field)
    model_id, kind, name = parts
    check_name(model_id, field)
    check_name(name, field)
    return CheckpointPath(model_id, kind, name)
