"""Pictures of an evaluation: ROC, precision-recall, confusion matrix, reliability, galleries.

Each function draws one figure into a PNG file and returns its path; the HTML report embeds them.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from fracdet.utils.atomic import save_figure

__all__ = [
    "plot_box_gallery",
    "plot_confusion",
    "plot_froc",
    "plot_gallery",
    "plot_pr",
    "plot_reliability",
    "plot_roc",
    "plot_stability",
    "plot_stability_compared",
]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc(labels: np.ndarray, probs: np.ndarray, points: dict[str, dict], path: Path, *, title: str) -> Path:
    """ROC curve with the operating points (chosen on validation) marked where they land on this split."""
    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(fpr, tpr, lw=2, label="model")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    for name, m in points.items():
        ax.scatter(1 - m["specificity"], m["sensitivity"], zorder=3, label=f"{name} (t={m['threshold']:.2f})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pr(labels: np.ndarray, probs: np.ndarray, path: Path, *, title: str) -> Path:
    """Precision-recall curve, with the prevalence as the chance line."""
    precision, recall, _ = precision_recall_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot(recall, precision, lw=2)
    ax.axhline(np.mean(labels), color="grey", ls=":", lw=1, label=f"prevalence {np.mean(labels):.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(m: dict, path: Path, *, title: str) -> Path:
    """The 2x2 confusion matrix at one threshold, counts and row percentages."""
    table = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(table, cmap="Blues")
    for (i, j), v in np.ndenumerate(table):
        share = v / max(1, table[i].sum())
        ax.text(j, i, f"{v}\n{share:.0%}", ha="center", va="center", color="black" if share < 0.6 else "white")
    ax.set(xticks=[0, 1], yticks=[0, 1], xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(["no fracture", "fracture"])
    ax.set_yticklabels(["no fracture", "fracture"])
    return _save(fig, path)


def plot_reliability(curves: dict[str, list[dict]], path: Path, *, title: str) -> Path:
    """Reliability diagram: observed fracture rate against predicted probability, per variant."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect")
    for name, rows in curves.items():
        ax.plot([r["confidence"] for r in rows], [r["observed"] for r in rows], marker="o", label=name)
    ax.set(xlabel="predicted probability", ylabel="observed fracture rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gallery(
    images: np.ndarray, labels: np.ndarray, probs: np.ndarray, threshold: float, path: Path, *, per_kind: int = 6
) -> Path:
    """The most confident true/false positives/negatives at ``threshold``: what the model gets right and wrong."""
    pred = probs >= threshold
    kinds = {
        "true positive": (labels == 1) & pred,
        "false negative": (labels == 1) & ~pred,
        "false positive": (labels == 0) & pred,
        "true negative": (labels == 0) & ~pred,
    }
    fig, axes = plt.subplots(4, per_kind, figsize=(1.8 * per_kind, 8.2), squeeze=False)
    for row, (kind, mask) in enumerate(kinds.items()):
        idx = np.flatnonzero(mask)
        # most confident first: high probability for predicted positives, low for predicted negatives
        order = idx[np.argsort(-probs[idx])] if "positive" in kind else idx[np.argsort(probs[idx])]
        for col in range(per_kind):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(order):
                k = order[col]
                ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"p={probs[k]:.2f}", fontsize=8)
        axes[row, 0].text(-0.1, 0.5, f"{kind}\n({mask.sum()})", transform=axes[row, 0].transAxes, ha="right",
                          va="center", fontsize=9)  # fmt: skip
    fig.suptitle(f"most confident cases at threshold {threshold:.2f}", fontsize=10)
    fig.subplots_adjust(left=0.12)
    return _save(fig, path)


def plot_froc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, *, title: str) -> Path:
    """FROC curves (lesion sensitivity against false-positive boxes per image), one per hit rule."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for name, (fp, sens) in curves.items():
        ax.step(fp, sens, where="post", label=name)
    for rate in (0.5, 1.0, 2.0):
        ax.axvline(rate, color="grey", lw=0.6, ls=":")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="false-positive boxes per image", ylabel="fractures hit", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_stability(result: dict, path: Path, *, title: str, target: float = 0.02) -> Path:
    """Verdict flip rate per re-encoding variant (95% intervals) beside the probability change it causes."""
    names = list(result["variants"])
    rows = [result["variants"][n] for n in names]
    y = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 0.5 * len(names) + 1.6), sharey=True)
    rates = np.array([r["flip_rate"] for r in rows])
    lo, hi = np.array([r["flip_rate_ci95"] for r in rows]).T
    left.barh(y, rates, xerr=[rates - lo, hi - rates], color="#c0504d", capsize=3)
    left.axvline(target, color="black", lw=0.8, ls="--", label=f"target {target:.0%}")
    left.set(yticks=y, yticklabels=names, xlabel=f"verdicts flipped at t={result['threshold']:.3f}")
    left.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    left.legend(fontsize=8)
    for key, offset, label in (("median_abs_change", -0.2, "median"), ("p90_abs_change", 0.2, "90th percentile")):
        right.barh(y + offset, [r[key] for r in rows], height=0.4, label=label)
    right.set(xlabel="|change of the probability|")
    right.legend(fontsize=8)
    fig.suptitle(f"{title} ({result['images']} images)", fontsize=10)
    return _save(fig, path)


def plot_stability_compared(results: dict[str, dict], path: Path, *, title: str, target: float = 0.02) -> Path:
    """Several models' :func:`plot_stability` side by side: per variant, one bar each (95% intervals).

    Each result is ``verdict_stability``'s (``threshold``, ``images``, ``variants``); models are compared at
    their own thresholds, as each would answer. Only the variants every result has are drawn.
    """
    names = [v for v in next(iter(results.values()))["variants"] if all(v in r["variants"] for r in results.values())]
    y = np.arange(len(names))
    height = 0.8 / len(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 0.35 * len(names) * len(results) + 2.4), sharey=True)
    for k, (label, result) in enumerate(results.items()):
        rows = [result["variants"][n] for n in names]
        at = y - 0.4 + height * (k + 0.5)
        rates = np.array([r["flip_rate"] for r in rows])
        lo, hi = np.array([r["flip_rate_ci95"] for r in rows]).T
        bars = left.barh(at, rates, height=height, xerr=[rates - lo, hi - rates], capsize=2,
                         label=f"{label} (t={result['threshold']:.3f}, {result['images']} images)")  # fmt: skip
        right.barh(at, [r["median_abs_change"] for r in rows], height=height, color=bars.patches[0].get_facecolor())
    left.axvline(target, color="black", lw=0.8, ls="--", label=f"target {target:.0%}")
    left.set(yticks=y, yticklabels=names, xlabel="verdicts flipped at each model's threshold")
    left.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    left.invert_yaxis()
    right.set(xlabel="median |change of the probability|")
    fig.suptitle(title, fontsize=10)
    legend_inches = 0.2 + 0.2 * np.ceil((len(results) + 1) / 2)  # two columns: the models and the target
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    return save_figure(fig, path)  # not _save: its tight_layout would take back the legend's room


def plot_box_gallery(
    images: np.ndarray,
    experts: list[list[tuple[float, float, float, float]]],
    boxes: list[list],
    captions: list[str],
    path: Path,
    *,
    title: str,
    columns: int = 4,
) -> Path:
    """Radiographs with the expert boxes (green) and the shown predicted boxes, drawn by level.

    ``boxes[i]`` are :class:`~fracdet.models.scoring.ScoredBox` es with a level: *definite* solid,
    *suspicious* dashed (:data:`~fracdet.models.scoring.LEVEL_STYLE`), each with its probability.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from fracdet.models.scoring import LEVEL_STYLE

    n = max(len(images), 1)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, ax in enumerate(axes.flat[: len(images)]):
        size = images[k].shape[0]
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
        for b in experts[k]:
            ax.add_patch(Rectangle((b[0] * size, b[1] * size), (b[2] - b[0]) * size, (b[3] - b[1]) * size,
                                   fill=False, color="lime", lw=1.2))  # fmt: skip
        for box in boxes[k]:
            style, colour = LEVEL_STYLE[box.level]
            ax.add_patch(Rectangle((box.x0 * size, box.y0 * size), (box.x1 - box.x0) * size, (box.y1 - box.y0) * size,
                                   fill=False, color=np.array(colour) / 255, ls=style, lw=1.5))  # fmt: skip
            ax.text(box.x0 * size, box.y0 * size - 2, f"{box.score:.2f}", color=np.array(colour) / 255, fontsize=6)
        ax.set_title(captions[k], fontsize=7)
    handles = [Line2D([], [], color="lime", label="expert box")] + [
        Line2D([], [], color=np.array(colour) / 255, ls=style, label=level)
        for level, (style, colour) in LEVEL_STYLE.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path)
