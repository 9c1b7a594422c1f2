"""What the low-pass costs at inference (issue 16): a model as built beside the same weights anti-aliased.

    python benchmarks/antialias.py [MODEL] --data ../shared/data/fracatlas [--runs 40] [--calibration 32]
        [--out benchmarks/results-antialias.json]

``MODEL`` (default ``fracatlas-localiser``: 1.0.0, the float model whose int8 graph is the default 1.1.1) and
``fracdet.models.rebuilt(MODEL, antialias=True)``, the same weights in networks whose strided steps run at
stride 1 and are followed by the 3x3 low-pass (docs/STABILITY.md, *Anti-aliasing*). Each is scored in the
three forms fracdet runs a model in: PyTorch in float, its exported graph (with the input gate's embedder, as
``fracdet quantize`` exports it) in ONNX Runtime in float, and that graph quantised to int8 as ``fracdet
quantize`` quantises it (:data:`fracdet.inference.quantize.QUANTISATION`; ``--calibration`` training
radiographs, seed 0, the same for both; the score and map heads in float). Batch 1 on validation
radiographs, the two models alternating call by call in each form so that the machine's load falls on both
alike; the median time of each and their ratio, and the multiply-adds of one forward pass (PyTorch's
``FlopCounterMode``, the same on every machine). Also how far the int8 graph moves the anti-aliased model's
margins from its float ones on those radiographs: that quantisation keeps the low-pass's output. The fusion
of the rebuilt model is not refitted: only time is compared here, no score. No test split is read.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def alternating(calls: dict[str, Callable[[np.ndarray], object]], images: np.ndarray, runs: int) -> dict[str, float]:
    """Median milliseconds of each call on one image at a time, the calls taking turns (3 warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for k in range(3 + runs):
        image = images[k % len(images)][None]
        for name, call in calls.items():
            started = time.perf_counter()
            call(image)
            if k >= 3:
                times[name].append(1000 * (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    import torch
    from int8_cpu import cpu_flags  # run as a script: benchmarks/ is on the path
    from torch.utils.flop_counter import FlopCounterMode

    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.inference.gate import InputGate
    from fracdet.inference.onnx import export_onnx
    from fracdet.inference.quantize import _quiet_quantiser, float_nodes, quantize_graph
    from fracdet.models import load, rebuilt
    from fracdet.models.compiled import GraphOutputs, OnnxRuntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-localiser", help="a float model (PyTorch weights)")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--runs", type=int, default=40, help="batch-1 calls per model and form, alternating")
    parser.add_argument("--images", type=int, default=40, help="validation radiographs the calls cycle through")
    parser.add_argument("--calibration", type=int, default=32, help="training radiographs that range the int8")
    parser.add_argument("--out", default="benchmarks/results-antialias.json")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    built = load(args.model)
    models = {"as built": built, "anti-aliased": rebuilt(built, antialias=True)}
    table = apply_manifest(load_dataset(args.data), built.splits_path)
    size = built.preprocess.input_size
    rng = np.random.default_rng(0)
    train, val = (table[table["split"] == split].reset_index(drop=True) for split in ("train", "val"))
    calib = load_pixels(train.iloc[np.sort(rng.choice(len(train), args.calibration, replace=False))], size,
                        desc="calibration").images  # fmt: skip
    images = load_pixels(val.iloc[np.sort(rng.choice(len(val), args.images, replace=False))], size,
                         desc="val").images  # fmt: skip
    cpu = {"machine": platform.machine(), "flags": cpu_flags(), "torch_threads": torch.get_num_threads()}
    result: dict = {"model": f"{built.name} {built.version}", "input_size": size, "cpu": cpu, "runs": args.runs,
                    "images": args.images, "calibration": args.calibration}  # fmt: skip

    flops = {}
    for name, model in models.items():
        with FlopCounterMode(display=False) as counter:
            model.margins(images[:1])
        flops[name] = counter.get_total_flops() / 2  # multiply-adds
    result["gmacs"] = {name: round(v / 1e9, 3) for name, v in flops.items()}

    gate = InputGate.of(built)
    embedder = gate.embedder().network if gate.fitted else None
    with tempfile.TemporaryDirectory() as folder:
        graphs: dict[str, dict[str, OnnxRuntime]] = {"onnxruntime float": {}, "onnxruntime int8": {}}
        for k, (name, model) in enumerate(models.items()):
            source = Path(folder) / f"{k}-float.onnx"
            with _quiet_quantiser():
                export_onnx(model, source, embedder=embedder)
            target = quantize_graph(source, Path(folder) / f"{k}-int8.onnx", calib, keep_float=float_nodes(source))
            graphs["onnxruntime float"][name] = OnnxRuntime(source)
            graphs["onnxruntime int8"][name] = OnnxRuntime(target)

        def graph_call(runtime: OnnxRuntime) -> Callable[[np.ndarray], GraphOutputs]:
            return lambda image: runtime(image, embedder_input(list(image)) if runtime.appearance else None)

        forms = {"pytorch float": {name: model.margins for name, model in models.items()}}
        forms |= {form: {name: graph_call(runtime) for name, runtime in runtimes.items()}
                  for form, runtimes in graphs.items()}  # fmt: skip
        result["median_ms"] = {}
        for form, calls in forms.items():
            medians = alternating(calls, images, args.runs)
            result["median_ms"][form] = {**{k: round(v, 2) for k, v in medians.items()},
                                         "ratio": round(medians["anti-aliased"] / medians["as built"], 3)}  # fmt: skip
            print(form, result["median_ms"][form], flush=True)
        steady = graph_call(graphs["onnxruntime int8"]["anti-aliased"])
        int8 = np.concatenate([steady(images[i : i + 1]).margins for i in range(len(images))])
        change = np.abs(int8 - models["anti-aliased"].margins(images))
        result["anti_aliased_int8_margin_change"] = {"median": round(float(np.median(change)), 4),
                                                     "max": round(float(change.max()), 4)}  # fmt: skip
    result["gmacs"]["ratio"] = round(flops["anti-aliased"] / flops["as built"], 3)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
