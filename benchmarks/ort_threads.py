"""How many ONNX Runtime threads should each of the server's workers use (issue 18)?

    python benchmarks/ort_threads.py [MODEL] --data ../shared/data/fracatlas [--images 40] [--callers 2]
        [--out benchmarks/results-ort-threads.json]

The model's scoring graph (with its gate's embedder, as served) scores distinct FracAtlas radiographs, decoded
and squashed beforehand so that only the graph is timed: one caller alone (the latency a lone request sees)
and ``--callers`` callers at once, as many as the server has workers on this machine (the throughput under
load), for each intra-op thread count from 1 to the cores. Sessions of each setting are built alike and
measured back to back in one run; only the ratios between settings count.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path


def main() -> None:
    from _graphs import radiographs, served_graph

    from fracdet.data.embed import embedder_input
    from fracdet.inference.onnx import OnnxRuntime
    from fracdet.models import load
    from fracdet.utils.workers import worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="fracatlas-default")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--callers", type=int, default=None, help="callers at once (default: one per core)")
    parser.add_argument("--out", default="benchmarks/results-ort-threads.json")
    args = parser.parse_args()
    cores = worker_count()
    callers = args.callers or cores
    model = load(args.model)
    graph = served_graph(model)
    _, images = radiographs(args.data, args.images, model.preprocess.input_size)
    runtimes = {threads: OnnxRuntime(graph, threads=threads) for threads in range(1, cores + 1)}
    appearance = runtimes[1].appearance
    feeds = [(image[None], embedder_input([image]) if appearance else None) for image in images]
    for runtime in runtimes.values():  # warm-up
        for image, extra in feeds[:3]:
            runtime(image, extra)
    result: dict = {"model": f"{model.name} {model.version}", "images": len(feeds), "cores": cores,
                    "callers": callers, "machine": platform.processor() or platform.machine(),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "threads": {}}  # fmt: skip
    for threads, runtime in runtimes.items():
        alone = []
        for image, extra in feeds:
            started = time.perf_counter()
            runtime(image, extra)
            alone.append(1000 * (time.perf_counter() - started))

        def work(runtime=runtime) -> None:
            for image, extra in feeds:
                runtime(image, extra)

        pool = [threading.Thread(target=work) for _ in range(callers)]
        started = time.perf_counter()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        under_load = 1000 * (time.perf_counter() - started) / (callers * len(feeds))
        result["threads"][str(threads)] = {"alone_median_ms": round(statistics.median(alone), 2),
                                           "under_load_ms_per_image": round(under_load, 2),
                                           "under_load_images_per_s": round(1000 / under_load, 1)}  # fmt: skip
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
