"""Do the heatmaps point at the fracture? Checked against the expert boxes of FracAtlas.

Two scores per fractured image with boxes: the *pointing game* (the heatmap's maximum falls inside an
expert box) and the IoU of the box derived from the heatmap with the best-matching expert box. A model
that ignored the image would still score something, so both are compared with a centre baseline: the
image centre as the point, and a box of the derived box's size centred in the image.

Boxes are ``(x0, y0, x1, y1)`` in [0, 1] of the whole image; images are squashed (not cropped) to the
model's square input, so the same normalised coordinates hold on the heatmap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fracdet.explain.cam import Explainer, heatmap_box, overlay
from fracdet.models.scoring import box_iou
from fracdet.utils.atomic import save_figure

__all__ = [
    "box_iou",
    "evaluate_localisation",
    "localisation_scores",
    "localisation_summary",
    "localise_split",
    "plot_localisation",
]

Box = tuple[float, float, float, float]


def _inside(x: float, y: float, boxes: list[Box]) -> bool:
    return any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in boxes)


def localisation_scores(heatmaps: np.ndarray, boxes: list[list[Box]]) -> pd.DataFrame:
    """Per image: pointing-game hit and derived-box IoU, for the heatmap and for the centre baseline."""
    rows = []
    for heat, expert in zip(heatmaps, boxes, strict=True):
        h, w = heat.shape
        py, px = np.unravel_index(np.argmax(heat), heat.shape)
        derived = heatmap_box(heat)
        bw, bh = (derived[2] - derived[0], derived[3] - derived[1]) if derived else (0.0, 0.0)
        centred = (0.5 - bw / 2, 0.5 - bh / 2, 0.5 + bw / 2, 0.5 + bh / 2)
        rows.append(
            {
                "hit": _inside((px + 0.5) / w, (py + 0.5) / h, expert),
                "iou": max((box_iou(derived, b) for b in expert), default=0.0) if derived else 0.0,
                "centre_hit": _inside(0.5, 0.5, expert),
                "centre_iou": max((box_iou(centred, b) for b in expert), default=0.0),
                "box": derived,
            }
        )
    return pd.DataFrame(rows)


def localisation_summary(scores: pd.DataFrame) -> dict[str, float]:
    """Means of :func:`localisation_scores` (with the number of images)."""
    return {
        "images": len(scores),
        "pointing_game": float(scores["hit"].mean()) if len(scores) else float("nan"),
        "centre_pointing_game": float(scores["centre_hit"].mean()) if len(scores) else float("nan"),
        "iou": float(scores["iou"].mean()) if len(scores) else float("nan"),
        "centre_iou": float(scores["centre_iou"].mean()) if len(scores) else float("nan"),
    }


def evaluate_localisation(explainer: Explainer, images: np.ndarray, boxes: list[list[Box]], *, batch_size: int = 16):
    """Heatmaps for ``images`` (fractured, with expert boxes) and their scores."""
    heatmaps = np.concatenate(
        [explainer(images[i : i + batch_size]).heatmaps for i in range(0, len(images), batch_size)]
    ) if len(images) else np.zeros((0, *images.shape[1:]), np.float32)  # fmt: skip
    return heatmaps, localisation_scores(heatmaps, boxes)


def plot_localisation(
    images: np.ndarray,
    heatmaps: np.ndarray,
    boxes: list[list[Box]],
    scores: pd.DataFrame,
    path: Path,
    *,
    n: int = 8,
    title: str = "Grad-CAM on fractured images: expert boxes green, heatmap box white",
) -> Path:
    """Overlays with expert boxes (green) and the derived box (white) for the first ``n`` images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(n, len(images))
    fig, axes = plt.subplots(1, max(n, 1), figsize=(2.4 * max(n, 1), 2.8), squeeze=False)
    for k in range(n):
        ax = axes[0, k]
        size = images[k].shape[0]
        ax.imshow(overlay(images[k], heatmaps[k]))
        for b in boxes[k]:
            ax.add_patch(Rectangle((b[0] * size, b[1] * size), (b[2] - b[0]) * size, (b[3] - b[1]) * size,
                                   fill=False, color="lime", lw=1.5))  # fmt: skip
        derived = scores["box"].iloc[k]
        if derived:
            d = [v * size for v in derived]
            ax.add_patch(Rectangle((d[0], d[1]), d[2] - d[0], d[3] - d[1], fill=False, color="white", ls="--", lw=1))
        ax.set_title(f"{'hit' if scores['hit'].iloc[k] else 'miss'}, IoU {scores['iou'].iloc[k]:.2f}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def _heatmaps(model, rows: pd.DataFrame, method: str, cache) -> tuple[np.ndarray, np.ndarray, list[list[Box]]]:
    """Pixels, heatmaps and expert boxes of ``rows`` for ``model``: its own map (``map``) or a CAM method."""
    from fracdet.data.pixels import load_pixels

    pixels = load_pixels(rows, model.preprocess.input_size, cache=cache, desc="decoding boxed images")
    boxes = [[tuple(b) for b in bs] for bs in pixels.table["boxes"]]
    if method == "map":
        heatmaps = model.score(pixels.images, max_boxes=0).maps
    else:
        heatmaps, _ = evaluate_localisation(Explainer(model, method), pixels.images, boxes)
    return pixels.images, heatmaps, boxes


def localise_split(
    model, table: pd.DataFrame, split: str, out_dir: Path, *, method: str | None = None, cache=None, compare=None
) -> dict[str, float] | None:
    """Localisation scores on the fractured images of ``split`` that carry expert boxes, with a figure.

    Args:
        method: ``map`` (a localiser's own fracture map), ``gradcam`` or ``gradcam++``; ``None``: ``map`` for a
            localiser, ``gradcam`` for a classifier.
        compare: another trained model (e.g. the shipped classifier) scored on the same images with Grad-CAM,
            so a report shows the localiser's gain beside it (``compare`` key of the result).

    Returns ``None`` when the table has no boxes (datasets without localisation annotations).
    """
    if "boxes" not in table:
        return None
    rows = table[(table["split"] == split) if split != "all" else slice(None)]
    rows = rows[(rows["label"] == 1) & rows["boxes"].map(lambda b: isinstance(b, list) and len(b) > 0)]
    if rows.empty:
        return None
    rows.attrs.update(table.attrs)
    method = method or ("map" if model.task == "localise" else "gradcam")
    images, heatmaps, boxes = _heatmaps(model, rows, method, cache)
    scores = localisation_scores(heatmaps, boxes)
    summary: dict = {"method": method, **localisation_summary(scores)}
    if compare is not None:
        _, other_maps, _ = _heatmaps(compare, rows, "gradcam", cache)
        summary["compare"] = {"model": f"{compare.name} {compare.version}", "method": "gradcam",
                              **localisation_summary(localisation_scores(other_maps, boxes))}  # fmt: skip
    plot_localisation(images, heatmaps, boxes, scores, Path(out_dir) / "localisation.png",
                      title=f"{method} on fractured images: expert boxes green, heatmap box white")  # fmt: skip
    return summary
