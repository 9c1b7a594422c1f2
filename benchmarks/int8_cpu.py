"""Does an int8 graph score on this CPU as its arithmetic says? Compiled models side by side, validation only.

    python benchmarks/int8_cpu.py [MODEL ...] --data ../shared/data/fracatlas [--runs 60]
        [--out benchmarks/results-int8-cpu.json]

ONNX Runtime runs an int8 graph in integer kernels chosen for the CPU at hand (on x86: VNNI, or AVX2 /
AVX-512 without it, whose uint8 x int8 products are summed in pairs into 16 bits that can saturate). For each
compiled model (default: ``fracatlas-default`` beside ``runs/int8/fracatlas-default-1.1.0``, the graph it
replaced), on the validation split of the model's own ``splits.csv``: the ROC AUC of its fused kernels and of
its reference arithmetic (nothing fused, the same on every CPU; :func:`fracdet.inference.quantize.kernel_change`),
how far the margins move between the two, how many verdicts change at the model's threshold, and the batch-1
time of each model's fused graph, the models alternating call by call. Records the CPU's flags. No test split
is read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def cpu_flags() -> list[str]:
    """The x86 flags that decide ONNX Runtime's int8 kernels, as ``/proc/cpuinfo`` names them (empty if unknown)."""
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def main() -> None:
    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.models import load
    from fracdet.models.compiled import OnnxRuntime, compiled_outputs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["fracatlas-default", "runs/int8/fracatlas-default-1.1.0"])
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--runs", type=int, default=60, help="batch-1 calls per model, alternating")
    parser.add_argument("--out", default="benchmarks/results-int8-cpu.json")
    args = parser.parse_args()

    models = [load(name) for name in args.models]
    first = models[0]
    table = apply_manifest(load_dataset(args.data), first.splits_path)
    val = load_pixels(table[table["split"] == "val"].reset_index(drop=True), first.preprocess.input_size, desc="val")
    labels = val.table["label"].to_numpy(int)
    result: dict = {"cpu": {"machine": platform.machine(), "flags": cpu_flags()}, "val_images": len(labels),
                    "models": {}}  # fmt: skip
    for name, model in zip(args.models, models, strict=True):
        if model.preprocess.input_size != first.preprocess.input_size:
            raise SystemExit(f"{name}: another input size than {args.models[0]}'s")
        fused = compiled_outputs(model, val.images, progress_desc=f"{model.version} fused").margins
        reference = OnnxRuntime(model.graph, spin="never", kernels="reference")
        exact = compiled_outputs(
            model, val.images, runtime=reference, progress_desc=f"{model.version} reference"
        ).margins
        change = np.abs(fused - exact)
        cut = model.temperature * np.log(model.threshold / (1 - model.threshold))
        result["models"][name] = {
            "version": model.version, "method": model.meta["graph"]["method"],
            "auc": {"fused": float(roc_auc_score(labels, fused)), "reference": float(roc_auc_score(labels, exact)),
                    "recorded_at_quantisation": model.meta["graph"]["val_auc"]["int8"]},
            "kernel_change": {"median": float(np.median(change)), "p90": float(np.percentile(change, 90)),
                              "max": float(change.max())},
            "verdicts_changed_at_threshold": int(((fused >= cut) != (exact >= cut)).sum()),
        }  # fmt: skip
    runtimes = [m.compiled_runtime(threads=None, spin="alone") for m in models]
    timings: list[list[float]] = [[] for _ in models]
    for k in range(3 + args.runs):
        image = val.images[k % len(val.images)][None]
        small = embedder_input(list(image))
        for runtime, times in zip(runtimes, timings, strict=True):
            started = time.perf_counter()
            runtime(image, small if runtime.appearance else None)
            if k >= 3:  # the first calls warm the sessions up
                times.append(1000 * (time.perf_counter() - started))
    for name, times in zip(args.models, timings, strict=True):
        result["models"][name]["graph_ms_median"] = statistics.median(times)
    base = statistics.median(timings[0])
    for name, times in zip(args.models, timings, strict=True):
        result["models"][name]["time_ratio_to_first"] = statistics.median(times) / base
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
