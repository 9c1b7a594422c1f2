"""The model's graph alone, PyTorch against ONNX Runtime, side by side in one process.

    python benchmarks/onnx_forward.py MODEL [MODEL ...] [--threads 2] [--runs 50] [--out F.json]

For each model (a release name or a run folder): export its :class:`~fracdet.models.graph.ScoringGraph`
(uint8 in; normalisation, margins, map or CAMs and the gate's features out; ``fracdet.inference.onnx``), check
that both back ends give the same margins on one image, then time batch-1 passes at the model's input size,
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

from fracdet.inference.onnx import OnnxRuntime, export_onnx
from fracdet.models import load
from fracdet.models.graph import TorchRuntime


def measure(name: str, threads: int, runs: int) -> dict:
    model = load(name)
    size = model.preprocess.input_size
    image = np.random.default_rng(0).integers(0, 256, (1, size, size), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        fast = OnnxRuntime(export_onnx(model, Path(folder) / "model.onnx"), threads=threads)
        reference = TorchRuntime(model)
        difference = float(np.abs(fast(image).margins - reference(image).margins).max())
        timings: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
        for _ in range(3):  # warm-up
            reference(image)
            fast(image)
        for _ in range(runs):
            started = time.perf_counter()
            reference(image)
            middle = time.perf_counter()
            fast(image)
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
