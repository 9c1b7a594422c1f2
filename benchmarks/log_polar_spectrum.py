"""The audit's log-polar spectra: fracdet's against the way they were first computed, side by side.

    python benchmarks/log_polar_spectrum.py ../shared/data/multiregion [--images 400] [--rounds 3]
        [--out benchmarks/results-log-polar-spectrum.json]

The pixel-alone alignment of the duplicate search (:func:`fracdet.data.neardup._register`) needs one log-polar
magnitude spectrum per thumbnail and orientation it meets (:func:`fracdet.data.neardup._log_polar_spectrum`).
The reference here is the computation as first written: NumPy's FFT and ``scipy.ndimage.map_coordinates``
(order 1) on the log-polar grid. fracdet's takes SciPy's FFT and gathers each cell from its four neighbours
with weights computed once (:func:`fracdet.data.neardup._log_polar_sample`). Over the first ``--images``
thumbnails of the dataset (the audit's own, from the feature cache), on one thread and on the search's
workers side by side, rounds alternating the order: the median milliseconds of wall time per spectrum of
each, whether the two interpolations agree to the bit on the same log-magnitudes, and the largest
difference of the two spectra relative to the spectrum's largest value (the two FFTs round differently in
single precision).
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


def reference_spectrum(cv2, image: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The log-polar spectrum as first computed, and the log-magnitudes it sampled."""
    from scipy import ndimage

    from fracdet.data.neardup import _log_polar_points, _spectrum_weights, _windowed_square

    magnitude = np.fft.fftshift(np.abs(np.fft.fft2(_windowed_square(cv2, image, side)[0])))
    magnitude *= _spectrum_weights(cv2, side)[1]
    logs = np.log1p(magnitude)
    return ndimage.map_coordinates(logs, _log_polar_points(side), order=1, cval=0.0).astype(np.float32), logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a dataset folder (its thumbnails come from the feature cache)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results-log-polar-spectrum.json")
    args = parser.parse_args()

    import cv2

    from fracdet.data import DuplicateConfig, find_duplicates, load_dataset
    from fracdet.data.features import load_thumbnail
    from fracdet.data.neardup import _REGISTER_SIDE, _log_polar_sample, _log_polar_spectrum
    from fracdet.utils.workers import worker_count

    side = _REGISTER_SIDE
    found = find_duplicates(load_dataset(args.data), DuplicateConfig(near_duplicates=False))
    thumbs = [load_thumbnail(data) for data in list(found.features.thumbnails.values())[: args.images]]
    unequal_cells, largest = 0, 0.0
    for image in thumbs:
        reference, logs = reference_spectrum(cv2, image, side)
        gathered = _log_polar_sample(logs).astype(np.float32)
        unequal_cells += int((gathered != reference).sum())
        ours = _log_polar_spectrum(cv2, image, side)[0]
        largest = max(largest, float(np.abs(ours - reference).max() / np.abs(reference).max()))

    spectra = {
        "reference": lambda image: reference_spectrum(cv2, image, side),
        "fracdet": lambda image: _log_polar_spectrum(cv2, image, side),
    }
    threads = worker_count()
    variants = [(name, n) for name in spectra for n in (1, threads)]
    times: dict[str, list[float]] = {f"{name}, {n} thread(s)": [] for name, n in variants}
    for round_ in range(args.rounds):
        for name, n in variants if round_ % 2 == 0 else reversed(variants):
            start = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:  # as the search calls it: pairs on the workers side by side
                list(pool.map(spectra[name], thumbs))
            times[f"{name}, {n} thread(s)"].append((time.perf_counter() - start) / len(thumbs) * 1e3)
    ms = {name: round(statistics.median(t), 2) for name, t in times.items()}
    ratios = {
        f"{n} thread(s)": round(ms[f"fracdet, {n} thread(s)"] / ms[f"reference, {n} thread(s)"], 3)
        for n in (1, threads)
    }
    result = {
        "command": "python benchmarks/log_polar_spectrum.py " + " ".join(sys.argv[1:]),
        "data": args.data, "thumbnails": len(thumbs), "side": side, "workers": threads, "rounds": args.rounds,
        "ms_per_spectrum": ms, "ms_per_spectrum_each_round": times,
        "ratio_fracdet_to_reference": ratios,
        "interpolation_unequal_cells": unequal_cells,
        "largest_difference_relative": largest,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = (
        "ms_per_spectrum",
        "ratio_fracdet_to_reference",
        "interpolation_unequal_cells",
        "largest_difference_relative",
    )
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
