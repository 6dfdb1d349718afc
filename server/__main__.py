"""The trainpulse command line.

    trainpulse serve [--host 127.0.0.1] [--port 8000] [--storage-dir var] [--models a,b] [--log-level INFO]
    trainpulse demo  [--port 8000] [--steps 30]   # server + examples/sft.py, dashboard URL printed

Every flag also reads from TRAINPULSE_<NAME> (for example TRAINPULSE_PORT); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .config import Settings, settings_from_env

logger = logging.getLogger("server")

REPO_ROOT = Path(__file__).resolve().parent.parent


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--storage-dir", type=Path, help="folder for the database, checkpoints and model cache")
    parser.add_argument("--data-dir", type=Path, help="folder of server-side datasets (default <storage>/data)")
    parser.add_argument("--cache-dir", type=Path, help="folder of converted models (default <storage>/model-cache)")
    parser.add_argument("--models", help="comma-separated model catalogue")
    parser.add_argument("--api-key", help="require this key in X-API-Key")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--worker-threads", type=int, help="threads that run model work")


def _settings(args: argparse.Namespace) -> Settings:
    models = tuple(part.strip() for part in args.models.split(",") if part.strip()) if args.models else None
    return settings_from_env({"host": args.host, "port": args.port, "storage_dir": args.storage_dir,
                              "data_dir": args.data_dir, "cache_dir": args.cache_dir, "models": models, "api_key": args.api_key,
                              "log_level": args.log_level, "worker_threads": args.worker_threads})


async def serve(settings: Settings) -> None:
    """Run the app on Hypercorn until SIGINT or SIGTERM."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    from .app import create_app

    app = create_app(settings)
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_s
    config.accesslog = None
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)

    async def shutdown_trigger() -> None:
        # Hypercorn waits for open responses before its own shutdown hooks run, and event streams
        # never end by themselves, so the streams are closed here first.
        await stop_requested.wait()
        logger.info("shutdown requested: closing event streams")
        await app.extensions["trainpulse"].hub.close()

    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)


def _wait_healthy(base_url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/api/v1/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"the server at {base_url} was not ready after {timeout_s:.0f} s")


def demo(args: argparse.Namespace) -> int:
    """Start the server, print the dashboard URL, run the SFT example against it, keep serving."""
    settings = _settings(args)
    base_url = f"http://{settings.host}:{settings.port}"
    env = {**os.environ, "TRAINPULSE_STORAGE_DIR": str(settings.storage_dir)}
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.storage_dir / "server.log"
    # The server logs to a file so the terminal shows the example's own output.
    with open(log_path, "ab") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", settings.host,
                                   "--port", str(settings.port)], env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(base_url, 120, server)
        print(f"\ntrainpulse is running. Dashboard: {base_url}/  (server log: {log_path})\n", flush=True)
        example = [sys.executable, str(REPO_ROOT / "examples" / "sft.py"), "--base-url", base_url,
                   "--steps", str(args.steps)]
        code = subprocess.call(example)
        print(f"\nThe SFT example finished (exit code {code}). Dashboard: {base_url}/", flush=True)
        if args.exit_after:
            return code
        print("The server keeps running so you can browse the dashboard; press Ctrl+C to stop.", flush=True)
        server.wait()
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainpulse", description="Tinker-compatible training server with live jobs")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the server")
    _add_server_flags(serve_parser)
    demo_parser = commands.add_parser("demo", help="run the server and the SFT example against it")
    _add_server_flags(demo_parser)
    demo_parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the SFT example")
    demo_parser.add_argument("--exit-after", action="store_true", help="stop the server when the example ends")
    args = parser.parse_args(argv)

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        asyncio.run(serve(settings))
        return 0
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
