"""Archive scoring on a Dask cluster against single-process ``fracdet predict``, side by side (issue 19).

    python benchmarks/archive.py --data ../shared/data/fracatlas [--images 600] [--workers 2]
        [--partition-size 64] [--out benchmarks/results-archive.json]

The same ``--images`` radiographs (the first in path order) are scored three ways, each from a cold start of
its own (the model loaded, the ONNX graph taken from the cache that a warm-up filled):

* ``predict``: what ``fracdet predict --manifest`` runs, one process (decoders on a thread pool, batches of 16);
* ``dask``: ``fracdet predict --engine dask`` on a local cluster of ``--workers`` single-threaded processes,
  partitions of ``--partition-size``, Parquet written; the cluster's start and each worker's model load
  included, as a user waits for them;
* ``dask (rerun)``: the same job again, every partition finished: what a resumed job pays before its work.

Reports images/s of each and the ratio to ``predict``, with the machine's cores. The rows of both are
checked equal (labels; probabilities within 2e-6) before any figure is written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from fracdet.inference import Predictor
    from fracdet.inference.archive import predict_archive
    from fracdet.models import load
    from fracdet.utils.workers import worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partition-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results-archive.json")
    args = parser.parse_args()
    os.environ["FRACDET_PROGRESS"] = "0"

    files = sorted(str(p) for p in Path(args.data).rglob("*.jpg"))[: args.images]
    Predictor(load(args.model), heatmaps=False).predict_files(files[:4])  # fills the ONNX cache

    started = time.perf_counter()
    single = Predictor(load(args.model), heatmaps=False).predict_files(files)
    predict_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        predict_archive(args.model, files, folder, workers=args.workers, partition_size=args.partition_size)
        dask_s = time.perf_counter() - started
        started = time.perf_counter()
        predict_archive(args.model, files, folder, workers=args.workers, partition_size=args.partition_size)
        rerun_s = time.perf_counter() - started
        import pandas as pd

        rows = pd.read_parquet(folder)
    assert rows["path"].tolist() == single["path"].tolist()
    assert rows["label"].fillna("").tolist() == single["label"].fillna("").tolist()
    np.testing.assert_allclose(rows["probability"].astype(float), single["probability"].astype(float), atol=2e-6)

    n = len(files)
    options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items())
    result = {
        "command": f"python benchmarks/archive.py {options}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cores": worker_count(), "cpu": platform.processor() or platform.machine()},
        "images": n,
        "predict": {"seconds": round(predict_s, 1), "images_per_s": round(n / predict_s, 1)},
        "dask": {"seconds": round(dask_s, 1), "images_per_s": round(n / dask_s, 1),
                 "ratio_to_predict": round(predict_s / dask_s, 2)},
        "dask_rerun_all_done": {"seconds": round(rerun_s, 1)},
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
