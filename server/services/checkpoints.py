"""Checkpoints on disk: saved adapters (with optimizer state) and sampler weights, with metadata.

A checkpoint is listed only once its metadata file exists. The backend writes the tensors
atomically first and the metadata last, so every listed checkpoint is complete and loadable.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import NotFoundError
from ..storage.paths import KINDS, CheckpointPath, parse

logger = logging.getLogger(__name__)

METADATA_FILE = "trainpulse.json"


class CheckpointService:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def directory(self, path: CheckpointPath) -> Path:
        return path.directory(self.root)

    def exists(self, path: CheckpointPath) -> bool:
        return (self.directory(path) / METADATA_FILE).is_file()

    def write_metadata(self, path: CheckpointPath, metadata: dict[str, Any]) -> None:
        target = self.directory(path) / METADATA_FILE
        temporary = target.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump({**metadata, "path": path.uri(), "created_at": time.time()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def read_metadata(self, path: CheckpointPath) -> dict[str, Any]:
        target = self.directory(path) / METADATA_FILE
        if not target.is_file():
            raise NotFoundError(f"checkpoint {path.uri()} not found", field="path")
        return json.loads(target.read_text())

    def resolve(self, uri: str, field: str = "path") -> tuple[CheckpointPath, dict[str, Any]]:
        path = parse(uri, field)
        return path, self.read_metadata(path)

    def list_for_model(self, model_id: str) -> list[dict[str, Any]]:
        found = []
        for kind in KINDS:
            folder = self.root / model_id / kind
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                metadata = _read_listed(entry / METADATA_FILE)
                if metadata is not None:
                    found.append({"checkpoint_id": f"{kind}/{entry.name}", "checkpoint_type":
                                  "training" if kind == "weights" else "sampler", "tinker_path": metadata["path"],
                                  "time": metadata["created_at"], "size_bytes": _size(entry),
                                  "base_model": metadata.get("base_model")})
        return found


def _read_listed(metadata_file: Path) -> dict[str, Any] | None:
    """Read a checkpoint's metadata; a missing or unreadable file means the checkpoint is not listed."""
    try:
        return json.loads(metadata_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("checkpoint %s skipped: unreadable metadata (%s)", metadata_file.parent, exc)
        return None


def _size(folder: Path) -> int:
    return sum(item.stat().st_size for item in folder.iterdir() if item.is_file())
