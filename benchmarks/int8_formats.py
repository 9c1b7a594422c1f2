"""Which int8 format scores alike on every CPU? One float model quantised several ways, validation only.

    python benchmarks/int8_formats.py [MODEL] --data ../shared/data/fracatlas [--formats u8s8 s8s8 u8s7]
        [--out benchmarks/results-int8-formats.json]

Exports the model's :class:`~fracdet.models.graph.ScoringGraph` (with its gate's embedder) and quantises it as
``fracdet quantize`` does (QDQ, per-channel weights, percentile ranges from 64 training radiographs, seed 0,
the score and map heads in float) in each format: ``u8s8`` (uint8 activations x int8 weights, 1.1.0's),
``s8s8`` (int8 x int8), ``u8s7`` (uint8 x int8 weights in a 7-bit range, ONNX Runtime's ``reduce_range``:
1.1.1's) and ``u8u8`` (uint8 x uint8). For each, on the validation split of the model's ``splits.csv``: how
far ONNX Runtime's fused kernels on this CPU move the margins from the graph's reference arithmetic
(:func:`fracdet.inference.quantize.kernel_change`), the ROC AUC of each, and the batch-1 time of the fused
graph. Records the CPU's flags (:mod:`benchmarks.int8_cpu`). No test split is read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def main() -> None:
    from int8_cpu import cpu_flags  # run as a script: benchmarks/ is on the path

    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.inference.gate import InputGate
    from fracdet.inference.onnx import export_onnx
    from fracdet.inference.quantize import (
        INT8_FORMATS,
        _quiet_quantiser,
        calibration_draw,
        float_nodes,
        quantize_graph,
    )
    from fracdet.models import load
    from fracdet.models.compiled import OnnxRuntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-localiser", help="a float model (PyTorch weights)")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--formats", nargs="+", default=["u8s8", "s8s8", "u8s7"], choices=list(INT8_FORMATS))
    parser.add_argument("--runs", type=int, default=40, help="batch-1 calls per format")
    parser.add_argument("--out", default="benchmarks/results-int8-formats.json")
    args = parser.parse_args()

    model = load(args.model)
    table = apply_manifest(load_dataset(args.data), model.splits_path)
    size = model.preprocess.input_size
    train = table[table["split"] == "train"]
    chosen = train.iloc[np.sort(calibration_draw(len(train), 64))]
    calib = load_pixels(chosen.reset_index(drop=True), size, desc="calibration").images
    val = load_pixels(table[table["split"] == "val"].reset_index(drop=True), size, desc="val")
    labels = val.table["label"].to_numpy(int)

    def margins(runtime: OnnxRuntime) -> np.ndarray:
        return np.concatenate([runtime(chunk, embedder_input(list(chunk))).margins
                               for chunk in np.array_split(val.images, max(1, len(val.images) // 32))])  # fmt: skip

    result: dict = {"model": f"{model.name} {model.version}", "cpu": cpu_flags(), "val_images": len(labels),
                    "formats": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "float.onnx"
        with _quiet_quantiser():
            export_onnx(model, source, embedder=InputGate.of(model).embedder().network)
        keep = float_nodes(source)
        for name in args.formats:
            target = quantize_graph(source, Path(folder) / f"{name}.onnx", calib, keep_float=keep, int8_format=name)
            fused = OnnxRuntime(target, spin="never")
            started = time.perf_counter()
            fast = margins(fused)
            seconds = time.perf_counter() - started
            exact = margins(OnnxRuntime(target, spin="never", kernels="reference"))
            times = []
            for k in range(3 + args.runs):
                image = val.images[k % len(val.images)][None]
                small = embedder_input(list(image))
                began = time.perf_counter()
                fused(image, small)
                if k >= 3:
                    times.append(1000 * (time.perf_counter() - began))
            change = np.abs(fast - exact)
            result["formats"][name] = {
                "auc": {"fused": float(roc_auc_score(labels, fast)), "reference": float(roc_auc_score(labels, exact))},
                "kernel_change": {"median": float(np.median(change)), "p90": float(np.percentile(change, 90)),
                                  "max": float(change.max())},
                "val_seconds_fused": seconds, "graph_ms_median": statistics.median(times),
            }  # fmt: skip
            print(name, json.dumps(result["formats"][name]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
