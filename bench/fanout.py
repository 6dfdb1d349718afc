"""Event fan-out benchmark: many SSE and WebSocket subscribers on one server during training.

    .venv/bin/python bench/fanout.py --sse 200 --ws 50
    .venv/bin/python bench/fanout.py --sse 1000 --processes 2

It starts its own server on 127.0.0.1 (tiny model) and connects the subscribers to the unfiltered
stream. An SDK loop of forward_backward and optim_step publishes events for --duration-s. The
script prints the delivery latency (the event's `time` field against the time the client parsed
it), the events delivered per second and the server's resident memory before and during the load.
Client and server share the machine, so the latency includes the clients' own scheduling delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect as ws_connect

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

TINY = "trainpulse/tiny-llama"
API_KEY = "tml-trainpulse-bench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sse", type=int, default=200, help="SSE subscribers")
    parser.add_argument("--ws", type=int, default=50, help="WebSocket subscribers")
    parser.add_argument("--duration-s", type=float, default=25.0, help="seconds of measured load")
    parser.add_argument("--processes", type=int, default=1, help="client processes the subscribers are split over")
    parser.add_argument("--batch", type=int, default=2, help="sequences per forward_backward")
    parser.add_argument("--cache-dir", type=Path, help="model cache to reuse (default: a new temporary one)")
    return parser.parse_args()


def raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(storage_dir: Path, cache_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRAINPULSE_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--storage-dir", str(storage_dir), "--cache-dir", str(cache_dir), "--models", TINY]
    # The server inherits the raised open-file limit, which it needs for 1,000 connections.
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(storage_dir / "server.log", "wb"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {storage_dir / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server was not ready after 180 s")


def train_until(base_url: str, stop: threading.Event, batch: int, steps: list[int]) -> None:
    """Run forward_backward and optim_step until `stop` is set, counting the steps."""
    import tinker
    from tinker import types

    training = tinker.ServiceClient(base_url=base_url, api_key=API_KEY).create_lora_training_client(
        base_model=TINY, rank=4, seed=0)
    ids = training.get_tokenizer().encode("Fan-out benchmark sequence for steady training events. " * 2)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
    while not stop.is_set():
        forward_backward = training.forward_backward([datum] * batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-4))
        forward_backward.result()
        optim.result()
        steps.append(1)


# ---- subscribers (run in client processes) ----------------------------------------------------

class Tally:
    """Latencies of events published inside the measured window, as the client saw them."""

    def __init__(self, window_start: float, window_end: float) -> None:
        self.window_start, self.window_end = window_start, window_end
        self.latencies_s: list[float] = []
        self.event_ids: set[int] = set()
        self.connected = 0
        self.errors: list[str] = []

    def record(self, envelope: dict) -> None:
        published_at = envelope["time"]
        if self.window_start <= published_at <= self.window_end:
            self.latencies_s.append(time.time() - published_at)
            self.event_ids.add(envelope["id"])


async def sse_subscriber(http: httpx.AsyncClient, url: str, tally: Tally, stop_at: float) -> None:
    async with aconnect_sse(http, "GET", url) as source:
        tally.connected += 1
        async for message in source.aiter_sse():
            tally.record(json.loads(message.data))
            if time.time() > stop_at:
                return


async def ws_subscriber(url: str, tally: Tally, stop_at: float) -> None:
    async with ws_connect(url, max_queue=None) as socket_:
        await socket_.send('{"op":"subscribe","id":1}')
        await socket_.recv()  # the acknowledgement
        tally.connected += 1
        async for raw in socket_:
            message = json.loads(raw)
            if message.get("op") == "event":
                tally.record(message["event"])
            if time.time() > stop_at:
                return


async def run_subscribers(base_url: str, sse: int, ws: int, window_start: float, window_end: float) -> Tally:
    tally = Tally(window_start, window_end)
    stop_at = window_end + 2.0  # late deliveries of in-window events still count
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), limits=limits) as http:
        tasks = [sse_subscriber(http, f"{base_url}/api/v1/events", tally, stop_at) for _ in range(sse)]
        ws_url = base_url.replace("http://", "ws://") + "/api/v1/ws"
        tasks += [ws_subscriber(ws_url, tally, stop_at) for _ in range(ws)]
        try:
            async with asyncio.timeout(window_end - time.time() + 10):
                results = await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            results = []
    tally.errors = [f"{type(result).__name__}: {result}" for result in results if isinstance(result, BaseException)]
    return tally


def client_process(base_url: str, sse: int, ws: int, window_start: float, window_end: float) -> dict:
    raise_open_file_limit(4 * (sse + ws) + 256)
    tally = asyncio.run(run_subscribers(base_url, sse, ws, window_start, window_end))
    return {"latencies_s": tally.latencies_s, "event_ids": tally.event_ids, "connected": tally.connected,
            "errors": tally.errors}


# ---- the run ----------------------------------------------------------------------------------

def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def main() -> int:
    args = parse_args()
    subscribers = args.sse + args.ws
    raise_open_file_limit(4 * subscribers + 256)

    with tempfile.TemporaryDirectory(prefix="trainpulse-fanout-") as scratch:
        storage_dir = Path(scratch) / "storage"
        storage_dir.mkdir()
        cache_dir = args.cache_dir or Path(scratch) / "cache"
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = start_server(storage_dir, cache_dir, port)
        server_process = psutil.Process(server.pid)
        try:
            return run_load(args, base_url, server_process)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def run_load(args: argparse.Namespace, base_url: str, server_process: psutil.Process) -> int:
    subscribers = args.sse + args.ws
    stop_training = threading.Event()
    steps: list[int] = []
    trainer = threading.Thread(target=train_until, args=(base_url, stop_training, args.batch, steps), daemon=True)
    trainer.start()
    while not steps and trainer.is_alive():  # the model is loaded and trained once before measuring
        time.sleep(0.2)
    rss_idle = server_process.memory_info().rss

    # Subscribers get 15 s to connect before the measured window opens.
    window_start = time.time() + 15.0
    window_end = window_start + args.duration_s
    parts = max(1, args.processes)
    with ProcessPoolExecutor(parts) as pool:
        futures = [pool.submit(client_process, base_url, sse, ws, window_start, window_end)
                   for sse, ws in zip(split(args.sse, parts), split(args.ws, parts))]
        rss_samples = sample_server(base_url, server_process, subscribers, window_start, window_end)
        results = [future.result() for future in futures]
    stop_training.set()
    trainer.join(timeout=60)

    latencies_s = sorted(value for result in results for value in result["latencies_s"])
    connected = sum(result["connected"] for result in results)
    errors = [error for result in results for error in result["errors"]]
    # Every subscriber reads the unfiltered stream, so together they saw every event of the window.
    published = len(set().union(*(result["event_ids"] for result in results)))
    report(args, latencies_s, connected, errors, rss_idle, rss_samples, published, len(steps))
    return 0 if latencies_s and connected == subscribers else 1


def sample_server(base_url: str, server_process: psutil.Process, subscribers: int, window_start: float,
                  window_end: float) -> dict[str, int]:
    """Sample the server's RSS and subscriber count until the window closes."""
    samples = {"connected_rss": 0, "max_rss": 0, "max_subscribers": 0}
    with httpx.Client(timeout=10) as http:
        while time.time() < window_end:
            status = http.get(f"{base_url}/api/v1/status").json()
            samples["max_subscribers"] = max(samples["max_subscribers"], status["subscribers"])
            rss = server_process.memory_info().rss
            if status["subscribers"] >= subscribers and not samples["connected_rss"]:
                samples["connected_rss"] = rss
            if time.time() >= window_start:
                samples["max_rss"] = max(samples["max_rss"], rss)
            time.sleep(0.5)
    return samples


def report(args, latencies_s, connected, errors, rss_idle, rss_samples, published, steps) -> None:
    subscribers = args.sse + args.ws
    mib = 1024 * 1024
    print(f"subscribers: {args.sse} SSE + {args.ws} WebSocket in {args.processes} client process(es); "
          f"connected {connected}/{subscribers}, server saw at most {rss_samples['max_subscribers']}")
    print(f"load: {args.duration_s:.0f} s, {steps} training steps, batch {args.batch}")
    if latencies_s:
        print(f"delivery latency: p50 {percentile(latencies_s, 0.5) * 1000:.1f} ms, "
              f"p99 {percentile(latencies_s, 0.99) * 1000:.1f} ms, max {latencies_s[-1] * 1000:.1f} ms, "
              f"mean {statistics.fmean(latencies_s) * 1000:.1f} ms")
    print(f"events: {published} published in the window ({published / args.duration_s:.1f}/s), "
          f"{len(latencies_s)} delivered ({len(latencies_s) / args.duration_s:.0f}/s); "
          f"expected {published * subscribers}")
    print(f"server RSS: {rss_idle / mib:.0f} MiB idle, {rss_samples['connected_rss'] / mib:.0f} MiB with "
          f"subscribers connected, {rss_samples['max_rss'] / mib:.0f} MiB max under load")
    if errors:
        print(f"subscriber errors: {len(errors)}, first: {errors[0]}")


if __name__ == "__main__":
    sys.exit(main())
