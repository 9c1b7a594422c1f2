"""The network's forward alone, PyTorch against ONNX Runtime, side by side in one process.

    python benchmarks/onnx_forward.py MODEL [MODEL ...] [--threads 2] [--runs 50] [--out F.json]

For each model (a release name or a run folder): export to ONNX (``fracdet.inference.onnx``), check that both
give the same margins (and map) on one image, then time batch-1 forwards at the model's input size,
alternating the two runtimes run by run so that machine load falls on both alike. Reports the median and
p95 in milliseconds and the ratio ONNX / PyTorch. Both use ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fracdet.inference.onnx import OnnxNetwork, export_onnx
from fracdet.models import load
from fracdet.models.predict import forward_scores, normalise


def measure(name: str, threads: int, runs: int) -> dict:
    model = load(name)
    size = model.preprocess.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, size, size), dtype=np.uint8)
    x = normalise(torch.from_numpy(image).unsqueeze(1), model.preprocess)
    with tempfile.TemporaryDirectory() as folder:
        network = OnnxNetwork(export_onnx(model, Path(folder) / "model.onnx"), threads=threads)
        batch = x.contiguous().numpy()
        with torch.no_grad():
            reference = forward_scores(model.module, x)[0].numpy()
        difference = float(np.abs(network(batch)[0] - reference).max())
        timings: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        with torch.no_grad():
            for _ in range(3):  # warm-up
                model.module(x)
                network(batch)
            for _ in range(runs):
                started = time.perf_counter()
                model.module(x)
                middle = time.perf_counter()
                network(batch)
                done = time.perf_counter()
                timings["pytorch"].append(1000 * (middle - started))
                timings["onnxruntime"].append(1000 * (done - middle))
    out = {k: {"median_ms": statistics.median(v), "p95_ms": float(np.percentile(v, 95))} for k, v in timings.items()}
    return {"model": name, "task": model.task, "input_size": size, "max_margin_difference": difference, **out,
            "ratio_onnx_to_pytorch": out["onnxruntime"]["median_ms"] / out["pytorch"]["median_ms"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="release names or run folders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"cpus": os.cpu_count(), "threads": args.threads, "runs": args.runs,
              "models": [measure(name, args.threads, args.runs) for name in args.models]}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
