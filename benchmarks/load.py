"""The server under load: many concurrent uploads, with the health endpoint watched throughout.

    python benchmarks/load.py [MODEL] [--users 64] [--seconds 60] [--image samples/fracatlas/images/...jpg]
                              [--out results.json]

Starts ``fracdet serve`` in its own process (as deployed), then runs ``--users`` locust users that each
upload the radiograph again and again (no pause), while a separate thread asks ``/api/v1/health`` every
100 ms and the server's resident memory is sampled every second. Reports: requests and errors by status
(a 503 with ``Retry-After`` is the server shedding load as designed, counted apart from errors), prediction
latency percentiles, health latency p50/p95/max, and RSS at start, peak, end and every 10 s (so "stable" is
read off a series, not two points). Targets (issue 16): zero errors, health p95 under 100 ms, RSS stable.
"""

# ruff: noqa: E402 - gevent must patch the standard library before anything else imports it (locust runs on it)
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests
from _serve import free_port, wait_healthy
from locust import HttpUser, constant, task
from locust.env import Environment

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "fracatlas" / "images" / "Fractured" / "IMG0000261.jpg"


def rss_mib(pid: int) -> float:
    with Path(f"/proc/{pid}/status").open() as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-default")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--image", default=str(SAMPLE))
    parser.add_argument("--out", help="also write the results here (none by default: cited results stay as kept)")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fracdet.cli", "serve", "--model", args.model, "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, server)
        data = Path(args.image).read_bytes()
        requests.post(f"{base}/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=60)  # warm-up
        result = run(base, server.pid, data, args.users, args.seconds)
    finally:
        server.terminate()
        server.wait(30)
    result.update(model=args.model, users=args.users, seconds=args.seconds, cpus=os.cpu_count())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def run(base: str, pid: int, data: bytes, users: int, seconds: float) -> dict:
    statuses: dict[str, int] = {}
    latencies: list[float] = []

    class Uploader(HttpUser):
        host = base
        wait_time = constant(0)

        @task
        def predict(self) -> None:
            with self.client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                                  catch_response=True, timeout=120) as response:  # fmt: skip
                statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
                if response.status_code == 200:
                    latencies.append(response.elapsed.total_seconds() * 1000)
                response.success()  # judged below: a 503 is load shedding, not a failure

    health: list[float] = []
    health_errors = 0
    memory: list[float] = [rss_mib(pid)]
    stop = threading.Event()

    def watch() -> None:
        nonlocal health_errors
        session = requests.Session()
        last_rss = time.monotonic()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                session.get(f"{base}/api/v1/health", timeout=10).raise_for_status()
                health.append((time.perf_counter() - started) * 1000)
            except requests.RequestException:
                health_errors += 1
            if time.monotonic() - last_rss >= 1:
                memory.append(rss_mib(pid))
                last_rss = time.monotonic()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    env = Environment(user_classes=[Uploader])
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users)
    time.sleep(seconds)
    runner.quit()
    stop.set()
    watcher.join(15)
    errors = sum(n for code, n in statuses.items() if code not in ("200", "503"))
    return {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "errors": errors,
        "predict_ms": _percentiles(latencies),
        "health_checks": len(health),
        "health_errors": health_errors,
        "health_ms": _percentiles(health),
        "rss_mib": {"start": memory[0], "peak": max(memory), "end": memory[-1], "every_10_s": memory[::10]},
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)), "max": float(max(values))}


if __name__ == "__main__":
    main()
