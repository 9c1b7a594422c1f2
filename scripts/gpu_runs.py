"""Train a list of runs within a time budget on a GPU machine, and bundle each for the trip back.

A lent GPU machine has a few minutes, no network, none of the datasets and no fracdet install; it
returns at most 8 files of at most 16 MiB. So training reads a pack (``fracdet pack``), runs go one after
another until ``--deadline`` seconds have passed (a run is cut at the deadline), and every run with a
checkpoint becomes one ``NAME.tar`` in ``--out``: float16 weights of its best epoch plus config, split
manifest and history (about 7 MB). A finished run carries its validation calibration; a cut one is
bundled from ``best.pt`` and is calibrated again by ``fracdet evaluate`` on the originals, as every
evaluation does anyway.

On the GPU machine, from the repository root (see docs/RESULTS.md, "GPU runs", for the whole recipe)::

    PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-384/manifest.csv \\
        --config configs/default-gpu.yaml --out $OUT --deadline 420

Back here: ``tar -xf NAME.tar -C runs/gpu`` and ``fracdet evaluate runs/gpu/NAME --data ORIGINAL``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

#: name -> config overrides; the first three answer the issue's question (3 seeds at 384 px), the rest
#: are one lever each, against seed 0.
DEFAULT_RUNS = {
    "default384-seed0": [],
    "default384-seed1": ["seed=1"],
    "default384-seed2": ["seed=2"],
    "lever-sampler-seed0": ["balance=sampler"],
    "lever-no-balance-seed0": ["balance=none"],
    "lever-scratch-seed0": ["pretrained=false"],
    "lever-no-augment-seed0": [f"augment.{k}=0" for k in ("hflip", "rotation", "scale", "translate", "contrast")],
}
KEEP = ("config.yaml", "splits.csv", "metrics.csv", "run.json", "curves.png")


def bundle(run: Path, out: Path) -> Path | None:
    """``out/NAME.tar`` with float16 weights of the run's best epoch and its records; ``None`` without any."""
    from fracdet.models import load, save_model

    if (run / "model.json").is_file():
        model = load(run)
    elif (run / "checkpoints" / "best.pt").is_file():
        model = load(run / "checkpoints" / "best.pt")
        model.meta["cut_at_deadline"] = True
    else:
        return None
    staging = out / "staging" / run.name
    save_model(model, staging, half=True)
    for name in KEEP:
        if (run / name).is_file():
            shutil.copy2(run / name, staging / name)
    target = out / f"{run.name}.tar"
    with tarfile.open(target, "w") as tar:
        tar.add(staging, arcname=run.name)
    shutil.rmtree(out / "staging")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest of a pack (fracdet pack)")
    parser.add_argument("--config", default="configs/default-gpu.yaml")
    parser.add_argument("--out", required=True, help="where the bundles go ($OUT on the GPU machine)")
    parser.add_argument("--runs-dir", default="/tmp/fracdet-runs")
    parser.add_argument("--deadline", type=float, default=420, help="seconds after which no run continues")
    parser.add_argument("--only", nargs="+", help="names from the default list to run (default: all, in order)")
    parser.add_argument("--set", action="append", default=[], help="override for every run (KEY=VALUE)")
    args = parser.parse_args()

    started = time.monotonic()
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(DEFAULT_RUNS)
    for name in names:
        left = args.deadline - (time.monotonic() - started)
        if left < 30:
            print(f"{name}: not started, {left:.0f} s left", flush=True)
            continue
        overrides = [x for kv in [*DEFAULT_RUNS[name], *args.set] for x in ("--set", kv)]
        command = [sys.executable, "-m", "fracdet", "train", "--config", args.config, "--data", args.data,
                   "--out", str(runs_dir / name), *overrides]  # fmt: skip
        print(f"{name}: {' '.join(command[1:])} ({left:.0f} s left)", flush=True)
        try:
            subprocess.run(command, check=True, timeout=left, env={**os.environ, "FRACDET_PROGRESS": "0"})
        except subprocess.TimeoutExpired:
            print(f"{name}: cut at the deadline", flush=True)
        except subprocess.CalledProcessError as exc:
            print(f"{name}: failed with status {exc.returncode}", flush=True)
        if bundled := bundle(runs_dir / name, out):
            print(f"{name}: {bundled} ({bundled.stat().st_size / 2**20:.1f} MiB)", flush=True)
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
