"""Ratio-test ORB matching: OpenCV's brute force against the audit's popcount matcher, side by side.

    python benchmarks/ratio_matches.py [--data ../shared/data/multiregion] [--images 300] [--pairs 2000]
        [--rounds 3] [--threads N] [--out benchmarks/results-ratio-matches.json]

Every candidate pair the duplicate search checks starts with Lowe's ratio test on the two thumbnails' ORB
descriptors (:func:`fracdet.data.neardup._ratio_matches`), a third of the search's thread time in a cold
multiregion audit. Two ways to get the nearest two descriptors of each row, both exact:

- ``cv2.batchDistance(..., NORM_HAMMING, K=2)``, the call ``BFMatcher.knnMatch`` makes (until 2 Dec);
- numpy's popcount over the four 64-bit words of each descriptor, then the nearest two per row (now).

Descriptors come from the thumbnails the audit makes (256 px, :func:`fracdet.data.features._analyse`) of the
first ``--images`` files of ``--data``, each also mirrored, with the audit's ORB settings; pairs are drawn at
random (seed 0). The pairs are shared among ``--threads`` threads (default: the search's workers), as the
search runs them; rounds alternate the order. Records the median wall milliseconds per pair of each, their
ratio, and whether both kept the same matches on every pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def batch_distance(des_a: np.ndarray, des_b: np.ndarray, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """The matcher until 2 Dec: OpenCV's brute-force nearest two, then the ratio test."""
    import cv2

    distance, nearest = cv2.batchDistance(des_a, des_b, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)
    query = np.flatnonzero((nearest[:, 1] >= 0) & (distance[:, 0] < ratio * distance[:, 1]))
    return query, nearest[query, 0]


def descriptors(data: Path, images: int) -> list[np.ndarray]:
    """ORB descriptors of the audit's thumbnails of ``images`` files, each as read and mirrored."""
    import cv2

    from fracdet.data import load_dataset
    from fracdet.data.features import _analyse, load_thumbnail

    orb = cv2.ORB_create(nfeatures=500, fastThreshold=10, edgeThreshold=15, patchSize=15)  # KeypointCache's
    out = []
    for path in load_dataset(data)["path"][:images]:
        _, thumb = _analyse(data / path)
        if thumb is None:
            continue
        image = load_thumbnail(thumb)
        for view in (image, np.ascontiguousarray(image[:, ::-1])):
            found = orb.detectAndCompute(cv2.equalizeHist(view), None)[1]
            if found is not None and len(found) >= 3:
                out.append(found)
    return out


def wall_ms_per_pair(matcher, found: list[np.ndarray], pairs: list[list[int]], threads: int) -> float:
    """Wall milliseconds per pair, the pairs dealt out to ``threads`` threads."""

    def work(share: list[list[int]]) -> None:
        for i, j in share:
            matcher(found[i], found[j])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, [pairs[k::threads] for k in range(threads)]))
    return round((time.perf_counter() - start) / len(pairs) * 1e3, 4)


def main() -> None:
    import cv2

    from fracdet.data.neardup import _ratio_matches
    from fracdet.utils.workers import worker_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/multiregion")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: the duplicate search's workers")
    parser.add_argument("--out", default="benchmarks/results-ratio-matches.json")
    args = parser.parse_args()

    cv2.setNumThreads(0)  # as in the search (fracdet.utils.workers.opencv_on_calling_threads)
    threads = args.threads or worker_count()
    found = descriptors(Path(args.data), args.images)
    pairs = np.random.default_rng(0).integers(0, len(found), (args.pairs, 2)).tolist()
    matchers = {"batchDistance": batch_distance, "popcount": _ratio_matches}
    same = all(
        all(np.array_equal(x, y) for x, y in zip(batch_distance(a, b), _ratio_matches(a, b), strict=True))
        for a, b in ((found[i], found[j]) for i, j in pairs)
    )
    times: dict[str, list[float]] = {name: [] for name in matchers}
    for round_ in range(args.rounds):
        for name in list(matchers)[:: 1 if round_ % 2 == 0 else -1]:
            times[name].append(wall_ms_per_pair(matchers[name], found, pairs, threads))
            print(f"round {round_ + 1}, {name}: {times[name][-1]} ms per pair", flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "command": "python benchmarks/ratio_matches.py " + " ".join(sys.argv[1:]),
        "data": args.data, "descriptor_sets": len(found), "pairs": len(pairs), "threads": threads,
        "rows_per_set_median": int(np.median([len(d) for d in found])),
        "ms_per_pair": times, "median_ms_per_pair": median,
        "ratio_popcount_to_batchdistance": round(median["popcount"] / median["batchDistance"], 3),
        "same_matches_on_every_pair": same, "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_ms_per_pair", "ratio_popcount_to_batchdistance",
                                              "same_matches_on_every_pair")}))  # fmt: skip
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
