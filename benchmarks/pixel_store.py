"""What a training table's pixels cost in memory and time: held in memory against the memory-mapped store
(issue 19).

    python benchmarks/pixel_store.py --data ../shared/data/fracatlas [--splits splits/fracatlas_seed0.csv]
        [--size 384] [--out benchmarks/results-pixel-store.json]

The train and validation rows of the manifest (every file without one), at the training size, read as one
epoch reads them (every image once, in a shuffled order), each way in a fresh process from a warm feature
cache (the images decoded beforehand, so no JPEG is decoded in any of the timed runs):

* ``in_memory``: the images copied out of the cache into one array in the process (what every load did
  before the store, and does now without a working cache);
* ``store_first``: the store written from the cache, then mapped (a table's first load);
* ``store_again``: the store mapped again (every later load of the same table: a resumed run, the next
  seed, evaluation of the same split).

For each: seconds to load, seconds to read every image once, and the process's anonymous memory
(``RssAnon``: what it must hold; the pages of a mapped file are the kernel's cache, shared by every process
that maps it and dropped under memory pressure) after reading. The store's file size is reported too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _measure(data: str, splits: str | None, size: int, cache_dir: str, in_memory: bool) -> dict:
    from fracdet.data import load_dataset
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import apply_manifest
    from fracdet.utils.cache import FeatureCache

    table = load_dataset(data)
    if splits:
        table = apply_manifest(table, splits)
        table = table[table["split"].isin(["train", "val"])]
    base = _anon_mib()
    start = time.perf_counter()
    pixels = load_pixels(table, size, cache=FeatureCache(cache_dir), in_memory=in_memory)
    loaded = time.perf_counter()
    for i in np.random.default_rng(0).permutation(len(pixels.images)):
        pixels.images[i].sum(dtype=np.int64)  # every byte of the image read
    read = time.perf_counter()
    return {
        "images": len(pixels.images),
        "load_s": round(loaded - start, 2),
        "read_s": round(read - loaded, 2),
        "anon_mib_held": round(_anon_mib() - base, 1),
        "mapped": isinstance(pixels.images, np.memmap),
    }


def run(data: str, splits: str | None, size: int, cache_dir: str, in_memory: bool) -> dict:
    """:func:`_measure` in a fresh process (its memory is this way's alone)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, data, splits, size, cache_dir, in_memory).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", help="split manifest: its train and val rows (default: every file)")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--cache", help="feature cache to use (default: a fresh one, filled first)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache or tmp
        run(args.data, args.splits, args.size, cache_dir, in_memory=True)  # decodes into the cache: not timed
        stores = Path(cache_dir) / "pixels"
        for path in stores.glob("*") if stores.exists() else []:
            path.unlink()
        result = {
            "in_memory": run(args.data, args.splits, args.size, cache_dir, in_memory=True),
            "store_first": run(args.data, args.splits, args.size, cache_dir, in_memory=False),
            "store_again": run(args.data, args.splits, args.size, cache_dir, in_memory=False),
        }
        result["store_mib"] = round(sum(p.stat().st_size for p in stores.glob("*.npy")) / 2**20, 1)
    result.update(data=args.data, splits=args.splits, size=args.size, machine=platform.machine(),
                  cpus=multiprocessing.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"))  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
