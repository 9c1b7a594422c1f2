"""The paper's hyper-parameter study: one run per learning rate x batch size x epochs, one table.

Every combination is an ordinary run folder under the sweep folder, so a sweep interrupted midway is
continued by running it again: finished runs are read back, an unfinished one resumes from its last
checkpoint. The table reports validation metrics only; the test split stays untouched.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fracdet.training.config import TrainConfig
from fracdet.training.trainer import train

__all__ = ["run_sweep", "sweep_name"]

log = logging.getLogger(__name__)


def sweep_name(lr: float, batch_size: int, epochs: int) -> str:
    """Folder name of one combination, e.g. ``lr0.001_bs32_ep10``."""
    return f"lr{lr:g}_bs{batch_size}_ep{epochs}"


def run_sweep(
    base: TrainConfig,
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    lrs: Sequence[float],
    batch_sizes: Sequence[int],
    epochs: Sequence[int],
) -> pd.DataFrame:
    """Train every combination (or read it back when done) and return one row per run.

    The row holds the best epoch by the config's monitored validation metric and the validation loss,
    accuracy and AUC at that epoch. Written to ``out_dir/sweep.csv`` and ``sweep.md`` as it goes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for lr, bs, ep in itertools.product(lrs, batch_sizes, epochs):
        config = base.with_overrides([f"optimizer.lr={lr}", f"batch_size={bs}", f"epochs={ep}"])
        run = out / sweep_name(lr, bs, ep)
        if (run / "model.json").exists():
            history = pd.read_csv(run / "metrics.csv")
        else:
            resume = (run / "checkpoints" / "last.pt").exists()
            log.info("sweep: %s%s", run.name, " (resuming)" if resume else "")
            history = train(None if resume else config, manifest, run, resume=resume).history
        best = history[history["best"].astype(bool)].iloc[-1]
        rows.append(
            {"lr": lr, "batch_size": bs, "epochs": ep, "best_epoch": int(best["epoch"]),
             "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"], "val_auc": best["val_auc"],
             "seconds": float(history["seconds"].sum()), "run": run.name}
        )  # fmt: skip
        table = pd.DataFrame(rows)
        table.to_csv(out / "sweep.csv", index=False)
        (out / "sweep.md").write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return pd.DataFrame(rows)
