"""Scoring a set of images on this CPU at several batch sizes, per released model; each in a fresh process.

    python benchmarks/score_batch.py [--images 64] [--rounds 2] [--batches 64 16 8 4]
        [--models fracatlas-localiser fracatlas-classifier fracatlas-default]
        [--out benchmarks/results-score-batch.json]

What ``fracdet evaluate``, calibration and fusion fitting call: :meth:`fracdet.models.TrainedModel.outputs`
over a whole split (PyTorch for float models, :func:`fracdet.models.compiled.compiled_outputs` for a compiled
graph), ``batch_size`` images at a time. On a GPU a large batch keeps the device busy; on a CPU each layer's
activations for a batch of 64 at 320 px are hundreds of MiB, so the memory-bound layers (batch norms, the
"same" padding of timm's TF-ported convolutions) wait on memory instead of the cache.

Each (model, batch) runs in a process of its own, rounds alternating the order (in one process the first
workload decides how fast later ones run: ``benchmarks/embedder.py``), scores the bundled sample's images
(tiled to ``--images``) twice and times the second pass. Records the median milliseconds per image and the
largest difference of each batch size's margins from those at the largest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("fracatlas-localiser", "fracatlas-classifier", "fracatlas-default")


def child(model_name: str, batch: int, images: int, out: Path) -> None:
    """Score ``images`` sample images twice with ``model_name`` at ``batch``; write the second pass's time and
    margins."""
    import torch

    from fracdet.data import load_dataset
    from fracdet.data.pixels import load_pixels
    from fracdet.models import load

    model = load(model_name)
    pixels = load_pixels(load_dataset(REPO / "samples" / "fracatlas"), model.preprocess.input_size).images
    pixels = np.concatenate([pixels] * (images // len(pixels) + 1))[:images]
    model.margins(pixels, batch_size=batch)  # warm-up: the first pass creates the kernels
    start = time.perf_counter()
    margins = model.margins(pixels, batch_size=batch)
    ms = (time.perf_counter() - start) / images * 1e3
    np.save(out.with_suffix(".npy"), margins)
    out.write_text(json.dumps({"ms_per_image": ms, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 16, 8, 4])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="benchmarks/results-score-batch.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_batch, args.images, args.child_out)
        return

    runs = [(m, b) for m in args.models for b in args.batches]
    times: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    margins: dict[tuple[str, int], np.ndarray] = {}
    threads = 0
    with tempfile.TemporaryDirectory(prefix="fracdet-score-batch-") as scratch:
        for round_ in range(args.rounds):
            for model_name, batch in runs if round_ % 2 == 0 else reversed(runs):
                out = Path(scratch) / "run.json"
                command = [sys.executable, __file__, "--child", model_name, "--child-batch", str(batch),
                           "--images", str(args.images), "--child-out", str(out)]  # fmt: skip
                subprocess.run(command, check=True)
                measured = json.loads(out.read_text())
                times[model_name, batch].append(measured["ms_per_image"])
                threads = max(threads, measured["threads"])
                margins[model_name, batch] = np.load(out.with_suffix(".npy"))
    largest = max(args.batches)
    models = {}
    for model_name in args.models:
        ms = {batch: round(statistics.median(times[model_name, batch]), 1) for batch in args.batches}
        models[model_name] = {
            "ms_per_image": ms,
            "ms_per_image_each_round": {batch: times[model_name, batch] for batch in args.batches},
            "ratio_to_largest_batch": {batch: round(ms[batch] / ms[largest], 3) for batch in args.batches},
            "max_abs_margin_difference": {
                batch: float(np.abs(margins[model_name, batch] - margins[model_name, largest]).max())
                for batch in args.batches
            },
        }
    result = {
        "command": "python benchmarks/score_batch.py " + " ".join(sys.argv[1:]),
        "threads": threads, "images": args.images, "rounds": args.rounds, "models": models,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({name: (m["ms_per_image"], m["ratio_to_largest_batch"]) for name, m in models.items()}))


if __name__ == "__main__":
    main()
