"""Training on a CPU with malloc as glibc ships it, told to keep what it frees, or replaced (issue 16).

    python benchmarks/train_malloc.py [--rounds 2] [--settings glibc audit train tcmalloc]
        [--set antialias=true ...] [--out benchmarks/results-train-malloc.json]

A CPU training step allocates its activations and gradients as blocks of tens to hundreds of MiB. glibc maps
each block above its mmap threshold (at most 32 MiB as it adapts) afresh and returns it when freed, so the
kernel zero-fills every page of it again at the next step: the fused recipe at 320 px spent half its time in
the kernel (300,000 minor page faults a second). ``fracdet train`` run from a shell now raises the
thresholds (``fracdet.utils.memory.TRAINING_THRESHOLDS``). Each setting trains one epoch of the bundled
sample (the recipe of ``micro_batch_memory.py``: 36 radiographs in training, batch 32 in parts of 16) in a
process of its own:

- ``glibc``: malloc as it ships;
- ``audit``: ``keep_freed_memory()`` with the audit's thresholds (blocks up to 64 MiB);
- ``train``: ``keep_freed_memory(**TRAINING_THRESHOLDS)``, what ``fracdet train`` does;
- ``tcmalloc``: gperftools' allocator preloaded (``LD_PRELOAD``), a reference where it is installed.

The settings take turns, ``--rounds`` times, so that the machine's drift falls on all alike. Each run's
epoch time (the trainer's own clock, without start-up), its process's CPU time in user and kernel space,
minor page faults and peak resident memory are recorded, with ratios to ``glibc``, and the epoch's training
loss, which must be the same in every setting (the allocator does not change the arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _child import run_measured  # run as a script: benchmarks/ is on the path
from _figures import pyplot, save

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
SETTINGS = ("glibc", "audit", "train", "tcmalloc")


def child(args: argparse.Namespace) -> None:
    """One setting: its malloc set as asked, then an epoch of the sample (``micro_batch_memory.child``)."""
    from fracdet.utils.memory import TRAINING_THRESHOLDS, keep_freed_memory

    if args.child == "audit":
        assert keep_freed_memory()
    elif args.child == "train":
        assert keep_freed_memory(**TRAINING_THRESHOLDS)
    from micro_batch_memory import child as epoch

    epoch(argparse.Namespace(setting=args.batch, config=args.config, set=args.set))


def measure(setting: str, args: argparse.Namespace) -> dict:
    """Run one setting in a process of its own: its CPU times, faults and peak memory are then its own."""
    command = [sys.executable, __file__, "--child", setting, "--batch", args.batch, "--config", args.config,
               "--set", *args.set]  # fmt: skip
    env = dict(os.environ)
    if setting == "tcmalloc":
        env["LD_PRELOAD"] = str(TCMALLOC)
    done = run_measured(command, env=env)
    if done.exit_code:
        return {"error": f"exit {done.exit_code}"}
    return {**done.counts(), **done.reported()}


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over the rounds, and the ratio of each setting's to ``glibc``'s."""
    keys = ("epoch_s", "wall_s", "user_s", "kernel_s", "minor_faults", "peak_rss_gib")
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in keys}
               for name, rows in runs.items() if rows and all("error" not in r for r in rows)}  # fmt: skip
    base = medians.get("glibc")
    for row in medians.values():
        if base:
            row["epoch_ratio_to_glibc"] = row["epoch_s"] / base["epoch_s"]
            row["fault_ratio_to_glibc"] = row["minor_faults"] / base["minor_faults"]
    return medians


def picture(result: dict, path: Path) -> None:
    plt = pyplot()
    medians = result["medians"]
    names = list(medians)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.9 + 0.45 * len(names)), sharey=True)
    for ax, key, label in ((axes[0], "epoch_s", "epoch of the sample (s)"),
                           (axes[1], "minor_faults", "minor page faults (millions)")):  # fmt: skip
        scale = 1e6 if key == "minor_faults" else 1
        values = [medians[n][key] / scale for n in names]
        ax.barh(names, values, color=["#c44" if n == "glibc" else "#48a" for n in names])
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f}", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, max(values) * 1.2)
    axes[0].invert_yaxis()
    fig.suptitle(f"{result['config']} {' '.join(result['set'])}, batch:micro {result['batch']}: "
                 f"median of {result['rounds']} rounds", fontsize=9)  # fmt: skip
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fused-gpu.yaml")
    parser.add_argument("--batch", default="32:16", help="BATCH:MICRO_BATCH")
    parser.add_argument("--set", nargs="*", default=["antialias=true"], help="config overrides, key=value")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results-train-malloc.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    settings = [s for s in args.settings if s != "tcmalloc" or TCMALLOC.exists()]
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name in settings[round_ % len(settings) :] + settings[: round_ % len(settings)]:  # turns rotate
            runs[name].append(row := measure(name, args))
            print(round_, name, json.dumps(row), flush=True)
    losses = {r["train_loss"] for rows in runs.values() for r in rows if "train_loss" in r}
    result = {"config": args.config, "set": args.set, "batch": args.batch, "rounds": args.rounds,
              "cpu_threads": os.cpu_count(), "same_training_loss": len(losses) == 1, "runs": runs,
              "medians": summarise(runs)}  # fmt: skip
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not result["medians"]:
        raise SystemExit(f"every setting failed: {out}")
    picture(result, out.with_suffix(".png"))
    print(json.dumps(result["medians"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
