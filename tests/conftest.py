"""Shared test harness: real trainpulse servers in subprocesses on 127.0.0.1, real SDK clients.

Every server gets its own storage folder (a real SQLite file and checkpoints) and shares one
model cache, so the tiny test model is built once per test session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "trainpulse/tiny-llama"
API_KEY = "tml-trainpulse-tests"
ARTIFACTS = REPO_ROOT / "test-artifacts"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: converts or runs the real SmolLM2 model (minutes); run with -m slow")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    port: int
    storage_dir: Path
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_server(storage_dir: Path, cache_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 60.0) -> RunningServer:
    port = port or free_port()
    storage_dir.mkdir(parents=True, exist_ok=True)
    log_path = storage_dir / f"server-{port}.log"
    server_env = {**os.environ, "TRAINPULSE_MODELS": TINY, "TRAINPULSE_CACHE_DIR": str(cache_dir),
                  "TRAINPULSE_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", **(env or {})}
    log_file = open(log_path, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--storage-dir", str(storage_dir)],
        cwd=REPO_ROOT, env=server_env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    server = RunningServer(f"http://127.0.0.1:{port}", port, storage_dir, log_path, process, server_env)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url("/api/v1/healthz"), timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"server not ready after {ready_timeout_s} s:\n{server.log()[-3000:]}")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole run; the tiny model is built here once."""
    cache = tmp_path_factory.mktemp("model-cache")
    from server.engine.catalogue import Catalogue

    Catalogue(cache).resolve(TINY)
    return cache


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_cache):
    """A server shared by the tests that do not restart or break it."""
    running = start_server(tmp_path_factory.mktemp("shared-server"), model_cache)
    yield running
    running.stop()


@pytest.fixture
def fresh_server(tmp_path, model_cache):
    """A server of this test's own, for tests that change limits, kill or restart it."""
    servers: list[RunningServer] = []

    def launch(storage_dir: Path | None = None, **kwargs) -> RunningServer:
        running = start_server(storage_dir or tmp_path / f"storage-{len(servers)}", model_cache, **kwargs)
        servers.append(running)
        return running

    yield launch
    for running in servers:
        running.stop()


@pytest.fixture
def service_client(server):
    import tinker

    client = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    yield client
    holder = getattr(client, "holder", None)
    close = getattr(holder, "close", None)
    if callable(close):
        close()


def make_client(server: RunningServer):
    import tinker

    return tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
