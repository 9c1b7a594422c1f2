"""The audit's embedder on this CPU: batch norms folded or not, batch sizes, side by side in one process.

    python benchmarks/embedder.py [--images 256] [--rounds 5] [--out benchmarks/results-embedder.json]

:class:`fracdet.data.embed.ImageEmbedder` embeds every content of an audit three times (plain, upright, centre
disc), so its time per image is most of a cold audit's. Variants, each over the same ``--images`` 128-px
images (random pixels: the time of a convolution does not depend on them), alternating round by round: the
network as timm builds it (batch norms run apart) and with them folded into the convolutions
(:func:`fracdet.data.embed.fold_batch_norms`, what the embedder runs), at batch sizes 8-64. Records the median
milliseconds per image and the largest difference of the folded embeddings from the unfolded ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import timm
    import torch

    from fracdet.data.embed import ImageEmbedder
    from fracdet.utils.pretrained import efficientnet_lite_state_dict

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results-embedder.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 128), np.uint8) for _ in range(args.images)]
    folded = ImageEmbedder()
    unfolded = ImageEmbedder()
    network = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    network.load_state_dict(efficientnet_lite_state_dict(0, network.state_dict()))
    network.reset_classifier(0)
    unfolded._model = network.eval().to(memory_format=torch.channels_last)  # as before the fold

    variants = {f"{name}, batch {size}": (embedder, size) for name, embedder in (("unfolded", unfolded),
                ("folded", folded)) for size in (8, 16, 32, 64)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name, (embedder, size) in variants.items():
            embedder.batch_size = size
            start = time.perf_counter()
            outputs[name] = embedder(images)
            if round_:
                times[name].append((time.perf_counter() - start) / len(images) * 1e3)
    ms = {name: round(statistics.median(t), 2) for name, t in times.items()}
    before, now = ms["unfolded, batch 64"], ms[f"folded, batch {ImageEmbedder().batch_size}"]
    result = {
        "command": "python benchmarks/embedder.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "images": args.images,
        "rounds": args.rounds, "ms_per_image": ms, "ms_per_image_each_round": times,
        "ratio_now_to_before": round(now / before, 3),
        "max_abs_difference_folded": float(np.abs(outputs["folded, batch 16"] - outputs["unfolded, batch 16"]).max()),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_per_image", "ratio_now_to_before", "max_abs_difference_folded")}))


if __name__ == "__main__":
    main()
