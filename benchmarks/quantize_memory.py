"""What int8 calibration holds in memory, and what holding less changes (issue 16): ``fracdet quantize
--calibration-batch``, one-shot against rounds, on one float model, validation only.

    python benchmarks/quantize_memory.py [MODEL] --data ../shared/data/fracatlas [--settings 16:0 8:0 16:8 16:1
        64:1] [--val 100] [--out benchmarks/results-quantize-memory.json]

ONNX Runtime's percentile calibration keeps every activation of every radiograph it has run until the round
ends, so ``fracdet quantize`` took 24 GB for an anti-aliased fused model at 320 px (64 radiographs at once,
as 1.1.1 was made). Each setting ``N:K`` quantises the model's served graph (its export with the gate's
embedder; the score and map heads in float) from the first ``N`` of the training radiographs ``fracdet
quantize`` draws (seed 0), ``K`` at a time (0: all at once), in a process of its own whose peak resident
memory is read when it ends. Every graph made, and the float one, then scores ``--val`` validation
radiographs (a seeded draw of the model's split), and each is compared with the first setting: the median and
largest ``|margin change|`` (logits). Two references say what a change of that size means: the first
setting's ``N`` drawn again from the next radiographs of the draw (another calibration set, all at once),
and the float graph. Writes the JSON and a picture beside it. No test split is read.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def calibration_images(train, size: int, count: int, skip: int = 0) -> np.ndarray:
    """Radiographs ``skip`` to ``skip + count`` of the 64 training radiographs ``fracdet quantize`` draws."""
    from fracdet.data.pixels import load_pixels
    from fracdet.inference.quantize import calibration_draw

    if skip + count > 64:
        raise SystemExit(f"fracdet quantize draws 64 calibration radiographs: {skip} + {count} is more")
    drawn = calibration_draw(len(train), 64)[skip : skip + count]
    return load_pixels(train.iloc[np.sort(drawn)].reset_index(drop=True), size, desc="calibration").images


def child(args: argparse.Namespace) -> None:
    """One setting, alone in its process so that its peak memory is its own."""
    from fracdet.inference.quantize import quantize_graph

    images = np.load(args.images)
    began = time.perf_counter()
    quantize_graph(Path(args.source), Path(args.target), images, keep_float=json.loads(Path(args.keep).read_text()),
                   calibration_batch=args.batch)  # fmt: skip
    print(json.dumps({"seconds": time.perf_counter() - began,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))  # fmt: skip


def picture(result: dict, path: Path) -> None:
    from _figures import pyplot, save  # run as a script: benchmarks/ is on the path

    plt = pyplot()

    names = list(result["settings"])
    rows = [result["settings"][n] for n in names]
    fig, (mem, moved) = plt.subplots(1, 2, figsize=(10, 3.6))
    mem.barh(names, [r["peak_rss_gib"] for r in rows], color=["#c44" if r["batch"] == 0 else "#48a" for r in rows])
    mem.set_xlabel("peak resident memory of the process (GiB)")
    mem.set_title("N:K = N radiographs, K at a time (0: all)", fontsize=9)
    mem.invert_yaxis()
    refs = {f"another {names[0].split(':')[0]} radiographs": result["another_draw"], "float graph": result["float"]}
    labels = names[1:] + list(refs)
    values = [r["vs_first"]["median"] for r in rows[1:]] + [r["median"] for r in refs.values()]
    moved.barh(labels, values, color=["#48a"] * (len(labels) - 2) + ["#999", "#999"])
    moved.set_xlabel(f"median |margin change| against {names[0]} (logits)")
    moved.set_title(f"{result['val_images']} validation radiographs", fontsize=9)
    moved.invert_yaxis()
    fig.suptitle(f"int8 calibration of {result['model']}: memory and what it changes", fontsize=10)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-localiser", help="a float model (PyTorch weights)")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--settings", nargs="+", default=["16:0", "8:0", "16:8", "16:1", "64:1"],
                        help="N:K, the first is the baseline")  # fmt: skip
    parser.add_argument("--val", type=int, default=100, help="validation radiographs the graphs are compared on")
    parser.add_argument("--out", default="benchmarks/results-quantize-memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("source", "target", "images", "keep"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from _graphs import served_graph  # run as a script: benchmarks/ is on the path
    from float_stride import home_relative

    from fracdet.data import load_dataset
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.inference.quantize import float_nodes
    from fracdet.models import load
    from fracdet.models.compiled import OnnxRuntime

    model = load(args.model)
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings]
    table = apply_manifest(load_dataset(args.data), model.splits_path)
    val = table[table["split"] == "val"].reset_index(drop=True)
    train = table[table["split"] == "train"]
    chosen = val.iloc[np.sort(np.random.default_rng(0).choice(len(val), min(args.val, len(val)), replace=False))]
    val_images = load_pixels(chosen, model.preprocess.input_size, desc="val").images
    source = served_graph(model)

    def margins(graph: Path) -> np.ndarray:
        runtime = OnnxRuntime(graph, spin="never")
        return np.concatenate([runtime(chunk, embedder_input(list(chunk)) if runtime.appearance else None).margins
                               for chunk in np.array_split(val_images, max(1, len(val_images) // 16))])  # fmt: skip

    def change(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        d = np.abs(a - b)
        return {"median": float(np.median(d)), "max": float(d.max())}

    result: dict = {"model": f"{home_relative(args.model)} ({model.name} {model.version})",
                    "val_images": len(val_images), "settings": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        keep = Path(folder) / "keep.json"
        keep.write_text(json.dumps(float_nodes(source)))
        made = {}
        first_n = settings[0][0]
        runs = [(f"{n}:{k}", n, k, 0) for n, k in settings] + [("another", first_n, 0, first_n)]
        for name, n, k, skip in runs:
            images = Path(folder) / f"calib-{n}-{skip}.npy"
            if not images.exists():
                np.save(images, calibration_images(train, model.preprocess.input_size, n, skip))
            target = Path(folder) / f"{name.replace(':', '-')}.onnx"
            done = subprocess.run([sys.executable, __file__, "--child", "--source", str(source), "--target",
                                   str(target), "--images", str(images), "--keep", str(keep), "--batch", str(k)],
                                  capture_output=True, text=True, check=True)  # fmt: skip
            made[name] = margins(target)
            if name != "another":
                result["settings"][name] = {"images": n, "batch": k, **json.loads(done.stdout.splitlines()[-1])}
            print(name, json.dumps(result["settings"].get(name, {})), flush=True)
        first = made[runs[0][0]]
        for name in result["settings"]:
            result["settings"][name]["vs_first"] = change(made[name], first)
        result["another_draw"] = change(made["another"], first)
        result["float"] = change(margins(source), first)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    picture(result, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
