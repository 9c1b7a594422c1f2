"""Would int8 pay (issue 18, optional part)? Static quantisation of a model's graph, judged on validation only.

    python benchmarks/int8.py [MODEL] --data ../shared/data/fracatlas [--calibration 64] [--runs 40]
        [--int8-format u8s7] [--out benchmarks/results-int8.json]

Exports the model's :class:`~fracdet.models.graph.ScoringGraph` (with its gate's embedder), quantises it with
ONNX Runtime's static quantisation (QDQ, int8 weights per channel, uint8 activations; ``--int8-format``: the
weights in 7 bits as ``fracdet quantize`` makes them, or ``u8s8``, 8 bits, as before 1.1.1), calibrated on
``--calibration`` training radiographs, then scores every validation radiograph of the model's own split with
both graphs: validation ROC AUC of each (the issue keeps int8 only if it stays within 0.005 of float), how
far the margins move, how many verdicts change at the model's threshold, and the batch-1 time of each graph,
alternating run by run. No test split is read.
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
    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.inference.gate import InputGate
    from fracdet.inference.onnx import OnnxRuntime, export_onnx
    from fracdet.inference.quantize import INT8_FORMATS, quantize_graph
    from fracdet.models import load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-localiser", help="a float model (PyTorch weights)")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--calibration", type=int, default=64, help="training radiographs to calibrate on")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--int8-format", default="u8s7", choices=list(INT8_FORMATS))
    parser.add_argument("--out", default="benchmarks/results-int8.json")
    args = parser.parse_args()

    model = load(args.model)
    gate = InputGate.of(model)
    embedder = gate.embedder().network if gate.checks_appearance else None
    table = apply_manifest(load_dataset(args.data), model.splits_path)
    size = model.preprocess.input_size
    rng = np.random.default_rng(0)
    train = table[table["split"] == "train"]
    calibration = train.iloc[rng.choice(len(train), args.calibration, replace=False)]
    calib = load_pixels(calibration.reset_index(drop=True), size, desc="calibration").images
    val_set = load_pixels(table[table["split"] == "val"].reset_index(drop=True), size, desc="val")
    labels = val_set.table["label"].to_numpy()

    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, Path(folder) / "fp32.onnx", embedder=embedder)
        int8 = Path(folder) / "int8.onnx"
        quantize_graph(fp32, int8, calib, int8_format=args.int8_format)
        runtimes = {"float32": OnnxRuntime(fp32), "int8": OnnxRuntime(int8)}
        sizes = {"float32": fp32.stat().st_size, "int8": int8.stat().st_size}
        margins = {}
        for name, runtime in runtimes.items():
            out = []
            for start in range(0, len(val_set.images), 16):
                chunk = val_set.images[start : start + 16]
                out.append(runtime(chunk, embedder_input(list(chunk)) if runtime.appearance else None).margins)
            margins[name] = np.concatenate(out)
        one = val_set.images[:1]
        extra = embedder_input(list(one))
        timings: dict[str, list[float]] = {name: [] for name in runtimes}
        for _ in range(3):
            for runtime in runtimes.values():
                runtime(one, extra if runtime.appearance else None)
        for k in range(args.runs):
            for name, runtime in runtimes.items():
                image = val_set.images[k % len(val_set.images)][None]
                small = embedder_input(list(image)) if runtime.appearance else None
                started = time.perf_counter()
                runtime(image, small)
                timings[name].append(1000 * (time.perf_counter() - started))
    threshold_margin = model.temperature * np.log(model.threshold / (1 - model.threshold))
    verdicts = {name: m >= threshold_margin for name, m in margins.items()}
    result = {
        "model": args.model, "version": model.version, "val_images": len(labels), "calibration_images": len(calib),
        "auc": {name: float(roc_auc_score(labels, m)) for name, m in margins.items()},
        "margin_change": {"median": float(np.median(np.abs(margins["int8"] - margins["float32"]))),
                          "max": float(np.abs(margins["int8"] - margins["float32"]).max())},
        "verdicts_changed_at_threshold": int((verdicts["int8"] != verdicts["float32"]).sum()),
        "graph_ms_median": {name: statistics.median(v) for name, v in timings.items()},
        "file_mib": {name: s / 2**20 for name, s in sizes.items()},
    }  # fmt: skip
    result["auc_drop"] = result["auc"]["float32"] - result["auc"]["int8"]
    result["keep_int8"] = result["auc_drop"] <= 0.005
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
