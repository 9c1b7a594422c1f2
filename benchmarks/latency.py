"""Latency of fracdet's prediction path, single image and under concurrent load.

    python benchmarks/latency.py [--model fracatlas-default] [--images samples/fracatlas/images] [--out F.json]

1. In process: every stage of one prediction (decode, preprocess, model + heatmap, PNG encoding of the
   overlay as the web app sends it), over the sample images, several rounds; median and p95.
2. Against the running web application (uvicorn on a free local port, in this process's threads):
   8 concurrent clients posting sample images; p50 and p95 of the request latency, and throughput.

Timings depend on the machine: the JSON records the CPU count and torch's thread count beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _serve import free_port

from fracdet.inference import Predictor, collect_inputs
from fracdet.models import load
from fracdet.serve import create_app, uvicorn_config
from fracdet.serve.app import _response


def readable(path: Path) -> bool:
    from fracdet.data import ImageReadError
    from fracdet.inference import read_input

    try:
        read_input(path.read_bytes(), str(path))
    except ImageReadError:
        return False
    return True


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def single_image(model_name: str, files: list[Path], rounds: int, backend: str = "auto") -> dict:
    model = load(model_name)
    predictor = Predictor(model, backend=backend)
    blobs = [f.read_bytes() for f in files]
    predictor.predict_bytes(blobs[0])  # warm-up: first call allocates
    stages: dict[str, list[float]] = {}
    for _ in range(rounds):
        for data in blobs:
            started = time.perf_counter()
            prediction = predictor.predict_bytes(data)
            encode = time.perf_counter()
            _response(prediction, model, 0.0, image=False, backend=predictor.backend)  # the API's answer
            done = time.perf_counter()
            for key, value in prediction.timings.items():
                stages.setdefault(key.removesuffix("_ms"), []).append(value)
            stages.setdefault("encode", []).append(1000 * (done - encode))
            stages.setdefault("total", []).append(1000 * (done - started))
    return {k: {"median_ms": statistics.median(v), "p95_ms": percentile(v, 95), "n": len(v)} for k, v in stages.items()}


def concurrent_clients(model_name: str, files: list[Path], clients: int, requests_per_client: int) -> dict:
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(load(model_name)), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api/v1/predict"
    blobs = [(f.name, f.read_bytes()) for f in files]

    def client(k: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as http:
            for r in range(requests_per_client):
                name, data = blobs[(k + r) % len(blobs)]
                started = time.perf_counter()
                response = http.post(url, files={"file": (name, data, "image/jpeg")})
                response.raise_for_status()
                latencies.append(1000 * (time.perf_counter() - started))
        return latencies

    client(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(client, range(clients)) for x in part]
    elapsed = time.perf_counter() - started
    server.should_exit = True
    thread.join(timeout=10)
    return {
        "clients": clients,
        "requests": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "throughput_per_s": len(latencies) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--images", default="samples/fracatlas/images")
    parser.add_argument("--limit", type=int, default=20, help="sample images used")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="0: no server measurement")
    parser.add_argument("--requests", type=int, default=6, help="requests per client")
    parser.add_argument("--backend", default="auto", help="the single-image path's: auto, onnxruntime or pytorch")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    files = [f for f in collect_inputs([args.images]) if readable(f)][: args.limit]  # refused files are not timed
    result = {
        "model": args.model,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "images": len(files),
        "backend": args.backend,
        "single_image": single_image(args.model, files, args.rounds, args.backend),
        "server": concurrent_clients(args.model, files, args.clients, args.requests) if args.clients else None,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
