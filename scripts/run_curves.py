"""Runs trained apart, side by side by epoch: validation loss, accuracy and AUC, one line per run.

    python scripts/run_curves.py NAME=RUN [NAME=RUN ...] --out curves.png [--table curves.md]

Each ``RUN`` is a run folder (its ``metrics.csv``, written after every epoch, so a run still training is
drawn as far as it has gone) or a ``metrics.csv`` itself: CPU runs of issue 16 take several sittings and a
run folder can go with its machine, so the figures of a finished arm are kept in ``docs/evidence`` and drawn
from there beside a run in progress. The picture is the sweep's (:func:`fracdet.training.sweep.plot_sweep`);
``--table`` also writes each run's validation AUC by epoch (the kept epoch in bold) as a markdown table: the
by-epoch figures docs/STABILITY.md quotes for its arms. They are the trainer's, before any refit, on
validation files only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fracdet.training.sweep import plot_sweep


def read_history(path: str | Path) -> pd.DataFrame:
    """A run's per-epoch metrics: ``path`` is the run folder or its ``metrics.csv``."""
    path = Path(path)
    csv = path / "metrics.csv" if path.is_dir() else path
    if not csv.is_file():
        raise SystemExit(f"{path}: no metrics.csv (is it a run folder that has finished an epoch?)")
    return pd.read_csv(csv)


def auc_table(histories: dict[str, pd.DataFrame]) -> str:
    """Validation AUC by epoch, one column per run, its kept (last best) epoch in bold."""
    columns = {}
    for name, history in histories.items():
        kept = history.loc[history["best"].astype(bool), "epoch"].max()
        columns[name] = {
            int(e): f"**{auc:.3f}**" if e == kept else f"{auc:.3f}"
            for e, auc in zip(history["epoch"], history["val_auc"], strict=True)
        }
    frame = pd.DataFrame(columns).sort_index().fillna("-")
    frame.index.name = "epoch"
    return frame.to_markdown() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN")
    parser.add_argument("--out", required=True, help="the picture (PNG)")
    parser.add_argument("--table", help="also write validation AUC by epoch here (markdown)")
    args = parser.parse_args()
    histories = {}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"{item!r}: give NAME=RUN")
        histories[name] = read_history(path)
    plot_sweep(histories, Path(args.out))
    table = auc_table(histories)
    print(table, end="")
    if args.table:
        Path(args.table).write_text(table)


if __name__ == "__main__":
    main()
