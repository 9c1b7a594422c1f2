"""What a training run holds in memory, loading processes included: this tree against an earlier revision.

    python benchmarks/train_memory.py [--baseline REV] [--data ../shared/data/fracatlas]
        [--splits splits/fracatlas_seed0.csv] [--config configs/fused-gpu.yaml] [--set KEY=VALUE ...]
        [--train-images 640] [--val-images 160] [--epochs 2] [--every 2] [--out benchmarks/results-train-memory.json]

Each side runs ``fracdet train`` on the same seeded subset of the manifest's training and validation rows, with
the recipe's own epochs (so its schedule) and ``--stop-after EPOCHS``, one after the other, each in a fresh
process. Every ``--every`` seconds the run's process tree is read from ``/proc``: the proportional set size
(PSS: shared pages divided among the processes that share them, so the tree's sum is what it holds) of the
training process and of its loading processes, and the loading processes' private pages. Records the peaks,
how many loading processes were started, the wall time, and whether both sides reached the same weights
(they should, to the bit: only when the loading processes start differs). The smallest ``MemAvailable`` of
the machine is recorded as well.

Issue 16: loading processes forked anew each epoch were copies of a training process grown by what training
allocates; at 192/224 px two of them ran a 24 GB machine out of memory. What a fork costs is not the
loading processes' private pages (they stay small): each page the training process writes after the fork
is copied for it, and the old page stays with the loading processes, shared between them. So they hold a
snapshot of the training process's memory as it was when they were forked, which the tree's PSS shows and
their private pages do not. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _checkout import checkout, revisions

ROOT = Path(__file__).resolve().parents[1]


def _rollup(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in KiB (empty once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines)
    return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) >= 2 and f[0].endswith(":") and f[1].isdigit()}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of any of its threads, recursively)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_training(src: Path, command: list[str], every: float) -> dict:
    """One ``fracdet train`` with the package under ``src``, its process tree sampled until it ends."""
    env = {**os.environ, "PYTHONPATH": str(src), "FRACDET_PROGRESS": "0"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fracdet", *command], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL)  # fmt: skip
    peaks = {"tree_pss_mib": 0.0, "trainer_pss_mib": 0.0, "loaders_pss_mib": 0.0, "loaders_private_mib": 0.0}
    loaders: set[int] = set()
    lowest_available = _available_mib()
    while process.poll() is None:
        children = _descendants(process.pid)
        loaders.update(children)
        trainer = _rollup(process.pid).get("Pss", 0) / 1024
        kids = [_rollup(child) for child in children]
        pss = sum(k.get("Pss", 0) for k in kids) / 1024
        private = sum(k.get("Private_Clean", 0) + k.get("Private_Dirty", 0) for k in kids) / 1024
        for key, value in (("tree_pss_mib", trainer + pss), ("trainer_pss_mib", trainer), ("loaders_pss_mib", pss),
                           ("loaders_private_mib", private)):  # fmt: skip
            peaks[key] = max(peaks[key], value)
        lowest_available = min(lowest_available, _available_mib())
        time.sleep(every)
    if process.returncode != 0:
        raise SystemExit(f"fracdet train with {src} failed ({process.returncode})")
    return {"wall_s": round(time.perf_counter() - start, 1), **{k: round(v) for k, v in peaks.items()},
            "loading_processes_started": len(loaders), "lowest_available_mib": round(lowest_available)}  # fmt: skip


def subset(splits: str, train_images: int, val_images: int, out: Path) -> Path:
    """A seeded sample of the manifest's training and validation rows (nothing else), written to ``out``."""
    table = pd.read_csv(splits)
    keep = [table[table["split"] == "train"].sample(train_images, random_state=0),
            table[table["split"] == "val"].sample(val_images, random_state=0)]  # fmt: skip
    pd.concat(keep).to_csv(out, index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with (default: the last commit)")
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--splits", default="splits/fracatlas_seed0.csv")
    parser.add_argument("--config", default="configs/fused-gpu.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to fracdet train")
    parser.add_argument("--train-images", type=int, default=640)
    parser.add_argument("--val-images", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2, help="--stop-after: epochs each side trains")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between two readings of /proc")
    parser.add_argument("--out", default="benchmarks/results-train-memory.json")
    args = parser.parse_args()

    revision, tree = revisions(args.baseline)
    runs, weights = {}, {}
    with tempfile.TemporaryDirectory(prefix="fracdet-memory-") as scratch, checkout(revision) as baseline_src:
        manifest = subset(args.splits, args.train_images, args.val_images, Path(scratch) / "splits.csv")
        for name, src in (("baseline", baseline_src), ("this", ROOT / "src")):
            out = Path(scratch) / name
            settings = [f"--set={setting}" for setting in args.set]
            command = ["train", "--config", args.config, "--data", args.data, "--splits", str(manifest), *settings,
                       "--stop-after", str(args.epochs), "--out", str(out)]  # fmt: skip
            runs[name] = run_training(src, command, args.every)
            print(f"{name}: {runs[name]}", flush=True)
            weights[name] = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    same = all(torch.equal(weights["baseline"][k], weights["this"][k]) for k in weights["baseline"])
    result = {
        "command": shlex.join(["python", "benchmarks/train_memory.py", *sys.argv[1:]]),
        "data": args.data, "splits": args.splits, "config": args.config, "set": args.set,
        "train_images": args.train_images, "val_images": args.val_images, "epochs": args.epochs,
        "cpus": os.cpu_count(), "baseline": revision, "this": tree, "runs": runs,
        "ratio_tree_pss_this_to_baseline": round(runs["this"]["tree_pss_mib"] / runs["baseline"]["tree_pss_mib"], 3),
        "ratio_loaders_pss_this_to_baseline": round(
            runs["this"]["loaders_pss_mib"] / max(1, runs["baseline"]["loaders_pss_mib"]), 3),
        "same_weights": same, "date": time.strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_tree_pss_this_to_baseline",
                                             "ratio_loaders_pss_this_to_baseline", "same_weights")}))  # fmt: skip
    if not same:
        raise SystemExit("the two sides trained different weights")


if __name__ == "__main__":
    main()
