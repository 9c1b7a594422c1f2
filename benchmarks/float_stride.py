"""What keeping the finest layers in float costs (issue 16): int8 models quantised with and without
``fracdet quantize --float-stride N``, and their float model, timed side by side.

    python benchmarks/float_stride.py MODEL [MODEL ...] --data ../shared/data/fracatlas [--runs 40]
        [--images 40] [--out benchmarks/results-float-stride.json]

Each ``MODEL`` (a release name or a model folder; the first is the baseline of the ratios) is run as fracdet
serves it: a compiled model's own graph, a float model's export with its gate's embedder
(``benchmarks/_graphs.py``), in ONNX Runtime. Batch 1 on ``--images`` validation radiographs of the first
model's split (seeded draw), the models taking turns call by call so that the machine's load falls on all
alike; the median time of each, its ratio to the first, and the nodes each graph keeps in float (from its
card). Only time is compared: the flips and AUC of each come from ``fracdet evaluate --stability``
(docs/STABILITY.md, *Anti-aliasing*). No test split is read.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np


def home_relative(name: str) -> str:
    """A model folder under the home directory as ``~/...``, so results name no one's account."""
    home = str(Path.home())
    return "~" + name[len(home) :] if name == home or name.startswith(home + "/") else name


def main() -> None:
    from _graphs import served_graph  # run as a script: benchmarks/ is on the path
    from antialias import alternating
    from int8_cpu import cpu_flags

    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.models import load
    from fracdet.models.compiled import OnnxRuntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="release names or model folders; the first is the baseline")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--runs", type=int, default=40, help="batch-1 calls per model, taking turns")
    parser.add_argument("--images", type=int, default=40, help="validation radiographs the calls cycle through")
    parser.add_argument("--out", default="benchmarks/results-float-stride.json")
    args = parser.parse_args()

    models = {name: load(name) for name in args.models}
    first = next(iter(models.values()))
    sizes = {model.preprocess.input_size for model in models.values()}
    if len(sizes) != 1:
        raise SystemExit(f"the models read different input sizes {sorted(sizes)}: not comparable side by side")
    table = apply_manifest(load_dataset(args.data), first.splits_path)
    val = table[table["split"] == "val"].reset_index(drop=True)
    chosen = val.iloc[np.sort(np.random.default_rng(0).choice(len(val), args.images, replace=False))]
    images = load_pixels(chosen, sizes.pop(), desc="val").images

    def call(runtime: OnnxRuntime):
        return lambda image: runtime(image, embedder_input(list(image)) if runtime.appearance else None)

    calls = {name: call(OnnxRuntime(served_graph(model))) for name, model in models.items()}
    medians = alternating(calls, images, args.runs)
    base = medians[args.models[0]]
    result = {
        "cpu": {"machine": platform.machine(), "flags": cpu_flags()}, "runs": args.runs, "images": args.images,
        "models": {home_relative(name): {"version": f"{model.name} {model.version}",
                          "float_nodes": (model.meta.get("graph") or {}).get("float_nodes", "all (float graph)"),
                          "median_ms": round(medians[name], 2), "ratio": round(medians[name] / base, 3)}
                   for name, model in models.items()},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
