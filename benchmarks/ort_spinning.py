"""Should ONNX Runtime's workers spin between operators (issue 18)?

    python benchmarks/ort_spinning.py [MODEL] --data ../shared/data/fracatlas [--images 40] [--callers 4]
        [--out benchmarks/results-ort-spinning.json]

Spinning workers are ready at once for the graph's next operator; sleeping ones must be woken. For one
radiograph alone, spinning is faster; under load, spinning workers take the cores that other calls and the
decoding of other uploads need. :class:`fracdet.models.compiled.OnnxRuntime` therefore spins only for a call
made while no other is running (``spin="alone"``; a server asks for ``spin="never"``: see
``docs/BENCHMARKS.md``). This compares it with one session that never spins (the
old behaviour) and one that always spins, in one run on the same distinct FracAtlas radiographs:

* *alone*: one call at a time with a pause between calls (as requests arrive in an emergency room), graph
  only (images decoded and squashed beforehand);
* *under load*: ``--callers`` threads (default: twice the cores) each reading, decoding and scoring files in
  a loop, as a busy server's workers do; images per second.

Settings are measured back to back, alternating; only the ratios between them count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

SETTINGS = ("never", "always", "alone")


def main() -> None:
    from _graphs import radiographs, served_graph

    from fracdet.data import ImageReadError, read_image
    from fracdet.data.embed import embedder_input
    from fracdet.data.pixels import resize_square
    from fracdet.inference.onnx import OnnxRuntime
    from fracdet.models import load
    from fracdet.utils.workers import worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-default")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--callers", type=int, default=None, help="callers under load (default: twice the cores)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every setting")
    parser.add_argument("--out", default="benchmarks/results-ort-spinning.json")
    args = parser.parse_args()
    cores = worker_count()
    callers = args.callers or 2 * cores
    model = load(args.model)
    size = model.preprocess.input_size
    paths, images = radiographs(args.data, args.images, size)
    runtimes = {spin: OnnxRuntime(served_graph(model), spin=spin) for spin in SETTINGS}

    def feed(image):
        return image[None], embedder_input([image]) if runtimes["never"].appearance else None

    feeds = [feed(image) for image in images]
    for runtime in runtimes.values():  # warm-up
        for image, extra in feeds[:3]:
            runtime(image, extra)
    alone: dict[str, list[float]] = {spin: [] for spin in SETTINGS}
    load_rate: dict[str, list[float]] = {spin: [] for spin in SETTINGS}
    for _ in range(args.rounds):
        for spin, runtime in runtimes.items():
            for image, extra in feeds:
                time.sleep(0.01)  # a pause between requests: the workers have gone to sleep
                started = time.perf_counter()
                runtime(image, extra)
                alone[spin].append(1000 * (time.perf_counter() - started))
        for spin, runtime in runtimes.items():

            def work(runtime=runtime) -> None:
                for path in paths:
                    try:
                        image = resize_square(read_image(path), size)
                    except ImageReadError:
                        continue
                    runtime(*feed(image))

            pool = [threading.Thread(target=work) for _ in range(callers)]
            started = time.perf_counter()
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            load_rate[spin].append(callers * len(images) / (time.perf_counter() - started))
    result = {"model": f"{model.name} {model.version}", "precision": model.precision, "images": len(images),
              "cores": cores, "callers": callers, "rounds": args.rounds,
              "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "settings": {spin: {"alone_median_ms": round(statistics.median(alone[spin]), 2),
                                  "under_load_images_per_s": round(statistics.median(load_rate[spin]), 1)}
                           for spin in SETTINGS}}  # fmt: skip
    never = result["settings"]["never"]
    for spin in SETTINGS:
        row = result["settings"][spin]
        row["alone_ratio_to_never"] = round(row["alone_median_ms"] / never["alone_median_ms"], 3)
        row["under_load_ratio_to_never"] = round(row["under_load_images_per_s"] / never["under_load_images_per_s"], 3)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
