"""Server settings, read once at start from command-line flags and TRAINPULSE_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "TRAINPULSE_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"  # address to listen on
    port: int = 8000  # TCP port; 0 picks a free one
    storage_dir: Path = Path("var")  # SQLite database, checkpoints and the model cache live here
    data_dir: Path | None = None  # folder for server-side SFT datasets; defaults to <storage_dir>/data
    models: tuple[str, ...] = ("HuggingFaceTB/SmolLM2-135M-Instruct", "trainpulse/tiny-llama")  # catalogue shown to clients
    api_key: str | None = None  # when set, requests must carry it in X-API-Key
    log_level: str = "INFO"
    worker_threads: int = 8  # threads that run model work; concurrent sample requests batch up to this many
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward micro-batch
    job_timeout_s: float = 3600.0  # default deadline of a job, from submission
    retention_s: float = 3600.0  # how long a finished job's result stays readable
    long_poll_s: float = 30.0  # how long retrieve_future holds a request for an unfinished job
    seq_gap_timeout_s: float = 30.0  # how long a lane waits for a missing seq_id before running the next one
    max_queued_per_model: int = 64  # queued jobs per model before 429
    max_queued_total: int = 1024  # queued jobs on the whole server before 429
    session_timeout_s: float = 120.0  # a session without heartbeat for this long loses its queued work
    shutdown_grace_s: float = 5.0  # time given to streams and requests to end on shutdown
    event_ring_size: int = 10_000  # recent events kept for replay after a reconnect (Last-Event-ID)
    event_queue_size: int = 1_000  # undelivered events per subscriber before it is dropped as lagging
    cache_dir: Path | None = None  # converted models, shared between storage folders; defaults to <storage_dir>/model-cache

    @property
    def database_path(self) -> Path:
        return self.storage_dir / "trainpulse.sqlite3"

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.storage_dir / "data"

    @property
    def checkpoint_dir(self) -> Path:
        return self.storage_dir / "checkpoints"

    @property
    def model_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return self.storage_dir / "model-cache"


def _convert(name: str, raw: str, annotation: str):
    if "tuple" in annotation:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if "Path" in annotation:
        return Path(raw)
    if annotation.startswith("int"):
        return int(raw)
    if annotation.startswith("float"):
        return float(raw)
    return raw


def settings_from_env(overrides: dict | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build settings from TRAINPULSE_<FIELD> variables, then apply explicit overrides (flags win)."""
    environ = os.environ if environ is None else environ
    values: dict = {}
    for item in fields(Settings):
        raw = environ.get(ENV_PREFIX + item.name.upper())
        if raw is None or raw == "":
            continue
        try:
            values[item.name] = _convert(item.name, raw, str(item.type))
        except ValueError as exc:
            raise ValueError(f"invalid {ENV_PREFIX}{item.name.upper()}={raw!r}: {exc}") from exc
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    settings = Settings(**values)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ValueError(f"invalid port {settings.port}: expected 0-65535")
    for name in ("job_timeout_s", "retention_s", "long_poll_s", "seq_gap_timeout_s", "session_timeout_s"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"invalid {name}={getattr(settings, name)}: expected a positive number of seconds")
    for name in ("worker_threads", "micro_batch_tokens", "max_queued_per_model", "max_queued_total",
                 "event_ring_size", "event_queue_size"):
        if getattr(settings, name) < 1:
            raise ValueError(f"invalid {name}={getattr(settings, name)}: expected at least 1")
    if not settings.models:
        raise ValueError("the model catalogue is empty: give at least one model name")
