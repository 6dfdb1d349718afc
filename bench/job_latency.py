"""Job-engine latency figures on a local server with the tiny model. Prints numbers, asserts nothing.

    .venv/bin/python bench/job_latency.py                     # builds the tiny model once into the cache
    .venv/bin/python bench/job_latency.py --cache-dir /tmp/cache --rounds 10

Measures:
  * cancel latency: from POST /api/v1/jobs/{id}/cancel to the job's finished_at, for a RUNNING
    forward_backward with one datum per micro-batch (the job stops at the next micro-batch);
  * job API response time: GET /api/v1/jobs/{id} and GET /api/v1/jobs while 50 jobs are queued;
  * submit latency: POST /api/v1/forward_backward while another step runs on the same model.
The server runs in a subprocess on 127.0.0.1, so figures include HTTP on loopback.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = "trainpulse/tiny-llama"
DATUM_TOKENS = 24
LONG_JOB_DATUMS = 200  # micro-batches of the job kept running while measuring
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _datum(offset: int) -> dict:
    tokens = [1 + (offset + i) % 500 for i in range(DATUM_TOKENS + 1)]
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"}}}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class Bench:
    def __init__(self, base_url: str, deadline: float) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        self.deadline = deadline

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("the benchmark ran past --max-seconds")

    def model(self) -> str:
        session_id = self.http.post("/api/v1/create_session", json={"tags": ["bench"]}).json()["session_id"]
        created = self.http.post("/api/v1/create_model", json={"session_id": session_id, "base_model": TINY,
                                                               "lora_config": {"rank": 4}}).json()
        self.wait_end(created["request_id"])
        return created["model_id"]

    def submit(self, model_id: str, datums: int) -> str:
        body = {"model_id": model_id, "forward_backward_input": {
            "loss_fn": "cross_entropy", "data": [_datum(7 * index) for index in range(datums)]}}
        response = self.http.post("/api/v1/forward_backward", json=body)
        response.raise_for_status()
        return response.json()["request_id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/api/v1/jobs/{job_id}").json()

    def wait_until(self, job_id: str, predicate) -> dict:
        while True:
            self.check_time()
            record = self.job(job_id)
            if predicate(record):
                return record
            time.sleep(0.005)

    def wait_end(self, job_id: str) -> dict:
        return self.wait_until(job_id, lambda record: record["state"] in TERMINAL)

    def wait_progress(self, job_id: str) -> dict:
        return self.wait_until(job_id, lambda record: record["state"] == "running"
                               and record["progress"]["completed"] >= 1)

    def cancel(self, job_id: str) -> None:
        self.http.post(f"/api/v1/jobs/{job_id}/cancel").raise_for_status()

    def cancel_latency(self, model_id: str, rounds: int) -> list[float]:
        latencies = []
        for _ in range(rounds):
            job_id = self.submit(model_id, LONG_JOB_DATUMS)
            self.wait_progress(job_id)
            requested = time.time()
            self.cancel(job_id)
            done = self.wait_end(job_id)
            if done["state"] != "cancelled":
                raise RuntimeError(f"job {job_id} ended {done['state']}, expected cancelled")
            latencies.append(done["finished_at"] - requested)
        return latencies

    def timed_gets(self, path: str, count: int) -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            self.http.get(path).raise_for_status()
            times.append(time.perf_counter() - started)
        return times

    def job_api_under_queue(self, model_id: str, queued: int) -> tuple[list[float], list[float]]:
        running = self.submit(model_id, LONG_JOB_DATUMS)
        self.wait_progress(running)
        waiting = [self.submit(model_id, 1) for _ in range(queued)]
        try:
            one = self.timed_gets(f"/api/v1/jobs/{waiting[queued // 2]}", 200)
            listing = self.timed_gets("/api/v1/jobs", 100)
        finally:
            for job_id in (*waiting, running):
                self.cancel(job_id)
        return one, listing

    def submit_while_running(self, model_id: str, count: int) -> list[float]:
        running = self.submit(model_id, LONG_JOB_DATUMS)
        self.wait_progress(running)
        times, submitted = [], []
        try:
            for _ in range(count):
                started = time.perf_counter()
                submitted.append(self.submit(model_id, 1))
                times.append(time.perf_counter() - started)
        finally:
            for job_id in (*submitted, running):
                self.cancel(job_id)
        return times


def start_server(storage_dir: Path, cache_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TRAINPULSE_MODELS": TINY, "TRAINPULSE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
           "TRAINPULSE_MICRO_BATCH_TOKENS": "32", "TRAINPULSE_MAX_QUEUED_PER_MODEL": "100",
           "TRAINPULSE_LOG_LEVEL": "WARNING"}
    log = open(storage_dir / "server.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
                                "--storage-dir", str(storage_dir)], cwd=REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    return process


def wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(base_url + "/api/v1/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "trainpulse-bench-cache",
                        help="converted-model cache, kept between runs (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=10, help="cancels to time (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop the whole run after this many seconds (default: %(default)s)")
    args = parser.parse_args()

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="trainpulse-bench-") as storage:
        process = start_server(Path(storage), args.cache_dir, port)
        try:
            wait_ready(base_url, process, timeout_s=min(300.0, args.max_seconds))
            bench = Bench(base_url, time.monotonic() + args.max_seconds)
            model_id = bench.model()

            cancels = bench.cancel_latency(model_id, args.rounds)
            print(f"cancel of a running job, request to finished_at ({len(cancels)} runs): "
                  f"median {_ms(statistics.median(cancels))}, max {_ms(max(cancels))}")

            one, listing = bench.job_api_under_queue(model_id, 50)
            print(f"GET /api/v1/jobs/{{id}} with 50 queued ({len(one)} calls): median {_ms(statistics.median(one))}, "
                  f"p99 {_ms(_percentile(one, 0.99))}")
            print(f"GET /api/v1/jobs with 50 queued ({len(listing)} calls): "
                  f"median {_ms(statistics.median(listing))}, p99 {_ms(_percentile(listing, 0.99))}")

            posts = bench.submit_while_running(model_id, 20)
            print(f"POST /api/v1/forward_backward while a step runs on the model ({len(posts)} calls): "
                  f"median {_ms(statistics.median(posts))}, worst {_ms(max(posts))}")
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
