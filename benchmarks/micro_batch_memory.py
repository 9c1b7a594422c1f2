"""What a training step holds in memory, whole or in micro-batches (issue 16): ``micro_batch`` in a config.

    python benchmarks/micro_batch_memory.py [--config configs/fused-gpu.yaml] [--settings 16:0 32:16 32:0]
        [--set antialias=true ...] [--out benchmarks/results-micro-batch-memory.json]

The fused recipe at 320 px with stability training runs each image with its re-saved copy: a batch of 32 is
64 radiographs forward and backward at once, more than two CPU cores' machine holds beside anything else.
Each setting ``B:M`` trains one epoch of the bundled sample (36 of its radiographs in training, 6 in
validation, the config's own size and recipe) at batch ``B``, ``M`` images forward and backward at a time
(0: the whole batch), in a process of its own whose peak resident memory is read when it ends; its epoch's
training loss is recorded beside it (runs that differ only in ``M`` differ only through batch-norm
statistics). Writes the JSON and a picture beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _child import run_measured  # run as a script: benchmarks/ is on the path
from _figures import pyplot, save

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "fracatlas"


def child(args: argparse.Namespace) -> None:
    """One setting: an epoch of the sample, in this process alone."""
    import numpy as np

    from fracdet.data import load_dataset
    from fracdet.training import load_config, train

    batch, micro = (int(v) for v in args.setting.split(":"))
    overrides = [*args.set, "epochs=1", f"batch_size={batch}", f"micro_batch={micro}", "workers=0",
                 "checkpoint_minutes=0", "early_stopping=0"]  # fmt: skip
    config = load_config(Path(args.config), overrides)
    table = load_dataset(SAMPLE)
    table = table.assign(split=np.where(np.arange(len(table)) % 8 == 0, "val", "train"))
    with tempfile.TemporaryDirectory() as folder:
        result = train(config, table, Path(folder) / "run")
    print(json.dumps({"train_loss": float(result.history["train_loss"].iloc[-1]),
                      "epoch_s": float(result.history["seconds"].iloc[-1]),
                      "train_images": int((table["split"] == "train").sum())}))  # fmt: skip


def measure(setting: str, args: argparse.Namespace) -> dict:
    """Run one setting in a process of its own, whose peak resident memory is then its own."""
    command = [sys.executable, __file__, "--child", setting, "--config", args.config,
               *(["--set", *args.set] if args.set else [])]  # fmt: skip
    done = run_measured(command)
    if done.exit_code:
        return {"error": f"exit {done.exit_code} (killed for memory if -9)"}
    batch, micro = (int(v) for v in setting.split(":"))
    return {"batch": batch, "micro_batch": micro, "peak_rss_gib": done.peak_rss_gib, "seconds": done.wall_s,
            **done.reported()}  # fmt: skip


def picture(result: dict, path: Path) -> None:
    plt = pyplot()
    rows = result["settings"]
    total = result["memory_gib"]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.5 * len(rows)))
    for y, row in enumerate(rows.values()):
        if "peak_rss_gib" in row:
            ax.barh(y, row["peak_rss_gib"], color="#c44" if row["micro_batch"] == 0 else "#48a")
            ax.text(row["peak_rss_gib"], y, f" {row['peak_rss_gib']:.1f}", va="center", fontsize=8)
        else:  # a setting that did not finish: drawn to the machine's memory, hatched
            ax.barh(y, total, color="none", edgecolor="#c44", hatch="//")
            ax.text(total / 2, y, row["error"], va="center", ha="center", fontsize=8, backgroundcolor="w")
    ax.axvline(total, color="k", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlim(0, total * 1.1)
    ax.set_xlabel("peak resident memory of the training process (GiB)")
    ax.set_ylabel("batch : micro-batch\n(0: whole batch)", fontsize=8)
    ax.invert_yaxis()
    title = f"{result['config']} {' '.join(result['set'])}: one epoch of the sample"
    ax.set_title(f"{title}\ndashed: the machine's {total:.1f} GiB", fontsize=9)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fused-gpu.yaml")
    parser.add_argument("--settings", nargs="+", default=["16:0", "32:16", "32:0"], help="BATCH:MICRO_BATCH")
    parser.add_argument("--set", nargs="*", default=[], help="further config overrides, key=value")
    parser.add_argument("--out", default="benchmarks/results-micro-batch-memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.setting = args.child
        return child(args)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    result = {"config": args.config, "set": args.set, "cpu_threads": os.cpu_count(), "memory_gib": memory,
              "settings": {}}  # fmt: skip
    for setting in args.settings:
        result["settings"][setting] = row = measure(setting, args)
        print(setting, json.dumps(row), flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    picture(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
