"""The paper's hyper-parameter study: learning rate x batch size x epochs, one table of validation metrics.

Every run is an ordinary run folder under the sweep folder, so a sweep interrupted midway is continued by
running it again: finished runs are read back, an unfinished one resumes from its last checkpoint.

When the learning-rate schedule does not depend on the total number of epochs (``none``, ``step``,
``plateau``, as in the paper's constant rate), a run of E epochs is exactly the first E epochs of a longer
run: the initial weights come from the seed and every epoch is seeded by ``(seed, epoch)`` (bit for bit on
the CPU; up to the nondeterminism of GPU kernels otherwise). The sweep then trains one run per learning
rate x batch size, to the largest epoch count, and reads each shorter count off its per-epoch history; the
paper's grid of 10, 25 and 49 epochs costs 49 epochs instead of 84. With ``cosine`` or ``onecycle`` each
count is a run of its own. The table reports validation metrics only; the test split stays untouched.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fracdet.training.config import TrainConfig
from fracdet.training.trainer import train
from fracdet.utils.atomic import atomic_write_text, save_figure
from fracdet.utils.cache import FeatureCache

__all__ = ["epochs_share_a_run", "plot_sweep", "run_sweep", "sweep_name"]

log = logging.getLogger(__name__)


def sweep_name(lr: float, batch_size: int, epochs: int) -> str:
    """Folder name of one run, e.g. ``lr0.001_bs32_ep10``."""
    return f"lr{lr:g}_bs{batch_size}_ep{epochs}"


def epochs_share_a_run(config: TrainConfig) -> bool:
    """Whether runs that differ only in ``epochs`` are prefixes of one another (the schedule ignores it)."""
    return config.schedule.name in ("none", "step", "plateau")


def _train_or_read(config: TrainConfig, manifest: pd.DataFrame, run: Path, cache: FeatureCache | None) -> pd.DataFrame:
    if (run / "model.json").exists():
        return pd.read_csv(run / "metrics.csv")
    resume = (run / "checkpoints" / "last.pt").exists()
    log.info("sweep: %s%s", run.name, " (resuming)" if resume else "")
    return train(None if resume else config, manifest, run, resume=resume, cache=cache).history


def plot_sweep(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """Validation loss, accuracy and AUC per epoch, one line per run: the paper's curves per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for name, history in histories.items():
            ax.plot(history["epoch"], history[f"val_{metric}"], marker="o", ms=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"validation {metric}")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def run_sweep(
    base: TrainConfig,
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    lrs: Sequence[float],
    batch_sizes: Sequence[int],
    epochs: Sequence[int],
    cache: FeatureCache | None = None,
) -> pd.DataFrame:
    """Train every combination (or read it back when done) and return one row per combination.

    The row holds the best epoch by the config's monitored validation metric among the first ``epochs``
    epochs, the validation loss, accuracy and AUC at that epoch, the training time of those epochs and the
    run folder they come from. ``cache`` is the pixel cache (default: the feature cache). Written to
    ``out_dir/sweep.csv`` and ``sweep.md`` as it goes, with the runs' validation curves in ``sweep.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shared = epochs_share_a_run(base)
    rows, curves = [], {}
    for lr, bs in itertools.product(lrs, batch_sizes):
        lengths = [max(epochs)] if shared else list(epochs)
        histories = {}
        for length in lengths:
            config = base.with_overrides([f"optimizer.lr={lr}", f"batch_size={bs}", f"epochs={length}"])
            run = out / sweep_name(lr, bs, length)
            histories[length] = (run, _train_or_read(config, manifest, run, cache))
            curves[run.name] = histories[length][1]
        for ep in epochs:
            run, history = histories[max(epochs) if shared else ep]
            prefix = history[history["epoch"] <= ep]
            best = prefix[prefix["best"].astype(bool)].iloc[-1]  # "best" flags are cumulative: last one wins
            rows.append(
                {"lr": lr, "batch_size": bs, "epochs": ep, "best_epoch": int(best["epoch"]),
                 "val_loss": best["val_loss"], "val_accuracy": best["val_accuracy"], "val_auc": best["val_auc"],
                 "seconds": float(prefix["seconds"].sum()), "run": run.name}
            )  # fmt: skip
        table = pd.DataFrame(rows)
        atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
        atomic_write_text(out / "sweep.md", table.to_markdown(index=False, floatfmt=".4f") + "\n")
        plot_sweep(curves, out / "sweep.png")
    return pd.DataFrame(rows)
