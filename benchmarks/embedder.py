"""The audit's embedder on this CPU: batch norms folded or not, batch sizes, callers; each in a fresh process.

    python benchmarks/embedder.py [--images 512] [--rounds 3] [--out benchmarks/results-embedder.json]

:class:`fracdet.data.embed.ImageEmbedder` embeds every content of an audit three times (plain, upright, centre
disc), so its time per image is a large part of a cold audit's. Variants, each over the same ``--images``
128-px images (random pixels: the time of a convolution does not depend on them):

- the network as timm builds it (batch norms run apart), batches of 64, called from one thread (before 1 Dec);
- batch norms folded into the convolutions (:func:`fracdet.data.embed.fold_batch_norms`), batches of 16, from
  one thread: PyTorch spreads each operation over the cores (until this change);
- folded, pieces of 64 images on as many threads as the audit has workers, side by side, at batches of 8, 16
  and 32 (what :func:`fracdet.data.features.compute_content_features` does: each thread's forward runs on
  the core it has);
- the same at batch 16 with timm's own "same" padding (``F.pad``) instead of the channels-last buffer of
  :func:`fracdet.data.embed.pad_channels_last` (until 2 Dec).

Each variant runs in a process of its own, rounds alternating the order: in one process the first variant
to run decides how fast the later ones are (after two threads had embedded side by side, one caller took 3.3
ms per image where it took 5-6 in a fresh process), so in-process comparisons mislead. Each process embeds
the images twice and times the second pass. Records the median milliseconds per image and the largest
difference of each variant's embeddings from those of the folded one-thread caller.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: name -> (batch norms folded, batch size, threads side by side: 0 = one caller, -1 = the audit's workers,
#: the strided convolutions padded as timm pads them)
VARIANTS = {
    "unfolded, batch 64, one caller": (False, 64, 0, True),
    "folded, batch 16, one caller": (True, 16, 0, False),
    "folded, batch 8, side by side": (True, 8, -1, False),
    "folded, batch 16, side by side": (True, 16, -1, False),
    "folded, batch 32, side by side": (True, 32, -1, False),
    "folded, batch 16, side by side, timm's padding": (True, 16, -1, True),
}
BEFORE, UNTIL_NOW, NOW = (
    "unfolded, batch 64, one caller",
    "folded, batch 16, one caller",
    "folded, batch 16, side by side",
)
TIMM_PADDING = "folded, batch 16, side by side, timm's padding"


def child(name: str, images: int, out: Path) -> None:
    """Embed ``images`` random images twice with variant ``name``; write the second pass's time and vectors."""
    from concurrent.futures import ThreadPoolExecutor

    import timm
    import torch

    from fracdet.data.embed import ImageEmbedder
    from fracdet.utils.pretrained import efficientnet_lite_state_dict
    from fracdet.utils.workers import worker_count

    folded, batch, threads, timm_padding = VARIANTS[name]
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (128, 128), np.uint8) for _ in range(images)]
    embedder = ImageEmbedder(batch_size=batch)
    if not folded:
        network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        network.load_state_dict(efficientnet_lite_state_dict(0, network.state_dict()))
        network.reset_classifier(0)
        embedder._model = network.eval().to(memory_format=torch.channels_last)  # as before the fold
    if timm_padding:
        for module in embedder.network.modules():
            module.__dict__.pop("forward", None)  # timm's Conv2dSame.forward: F.pad, then the convolution
    threads = worker_count() if threads < 0 else threads

    def run() -> np.ndarray:
        if not threads:
            return embedder(pixels)
        pieces = [pixels[start : start + 64] for start in range(0, len(pixels), 64)]
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(embedder, pieces)))

    run()  # warm-up: the first pass creates the kernels
    start = time.perf_counter()
    vectors = run()
    ms = (time.perf_counter() - start) / images * 1e3
    np.save(out.with_suffix(".npy"), vectors)
    out.write_text(json.dumps({"ms_per_image": ms, "threads": threads}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results-embedder.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.child_out)
        return

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    vectors: dict[str, np.ndarray] = {}
    threads = 0
    with tempfile.TemporaryDirectory(prefix="fracdet-embedder-") as scratch:
        for round_ in range(args.rounds):
            for name in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
                out = Path(scratch) / "run.json"
                command = [sys.executable, __file__, "--child", name, "--images", str(args.images),
                           "--child-out", str(out)]  # fmt: skip
                subprocess.run(command, check=True)
                measured = json.loads(out.read_text())
                times[name].append(measured["ms_per_image"])
                threads = max(threads, measured["threads"])
                vectors[name] = np.load(out.with_suffix(".npy"))
    ms = {name: round(statistics.median(t), 2) for name, t in times.items()}
    reference = vectors[UNTIL_NOW]
    result = {
        "command": "python benchmarks/embedder.py " + " ".join(sys.argv[1:]),
        "cpus": threads, "images": args.images, "rounds": args.rounds, "ms_per_image": ms,
        "ms_per_image_each_round": times,
        "ratio_now_to_before": round(ms[NOW] / ms[BEFORE], 3),
        "ratio_now_to_one_caller": round(ms[NOW] / ms[UNTIL_NOW], 3),
        "ratio_channels_last_padding_to_timms": round(ms[NOW] / ms[TIMM_PADDING], 3),
        "max_abs_difference": {name: float(np.abs(v - reference).max()) for name, v in vectors.items()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    keys = ("ms_per_image", "ratio_now_to_before", "ratio_now_to_one_caller", "ratio_channels_last_padding_to_timms",
            "max_abs_difference")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
