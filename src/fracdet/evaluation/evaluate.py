"""Evaluate a trained model on one split: metrics with intervals at validation-chosen operating points,
calibration, subgroups, pictures, and a self-contained HTML report.

The validation split chooses every threshold and the temperature; the evaluated split only measures.
A model whose checkpoint was selected on the test split (paper reproduction) is flagged in every output.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from fracdet.data.pixels import load_pixels
from fracdet.data.sources import FRACTURE_SIZES
from fracdet.data.split import leave_out_trained_on
from fracdet.data.table import absolute_paths
from fracdet.evaluation import plots
from fracdet.evaluation.lesions import LesionData, lesion_metrics, lesion_table, localised_sensitivity
from fracdet.evaluation.metrics import (
    METRICS,
    binary_metrics,
    bootstrap_interval,
    bootstrap_intervals,
    expected_calibration_error,
    reliability_bins,
    specificity_at_sensitivity,
    threshold_choice_intervals,
)
from fracdet.evaluation.stability import verdict_stability
from fracdet.models.release import TrainedModel
from fracdet.models.scoring import ScoredBox, level_thresholds, scores_from_outputs, shown_boxes
from fracdet.training.calibrate import OPERATING_POINTS, choose_thresholds, fit_temperature, probabilities
from fracdet.training.checkpoint import write_json
from fracdet.utils.atomic import atomic_file, atomic_write_text
from fracdet.utils.cache import FeatureCache

__all__ = ["Evaluation", "evaluate", "lesion_summary", "write_report"]

log = logging.getLogger(__name__)

#: Table columns that split the evaluated images into subgroups (FracAtlas metadata; absent columns are skipped).
SUBGROUP_COLUMNS = ("region", "view", "hardware", "fracture_size")
#: Columns that describe fractures only: their rows compare one group's fractures with every image without one.
_FRACTURE_ONLY = ("fracture_size",)
_SIZE_ORDER = {name: i for i, (_, name) in enumerate(FRACTURE_SIZES)}  # small to large, not alphabetical
#: Sensitivities at which the evaluated split's own ROC is read (threshold-free, like the AUC).
ROC_SENSITIVITIES = (0.90, 0.95)


TEST_SELECTION_WARNING = (
    "This model's checkpoint was selected on the TEST split (paper reproduction). Its test numbers are "
    "optimistic by construction and are not an estimate of performance on new patients."
)


@dataclass
class Evaluation:
    """Everything measured on one split (``to_dict`` is ``metrics.json``)."""

    model: str
    arch: str
    split: str
    selected_on: str
    temperature: float
    thresholds: dict[str, float]
    thresholds_from: str
    default_point: str
    points: dict[str, dict[str, Any]]
    calibration: dict[str, Any]
    subgroups: pd.DataFrame
    roc_specificity: dict[str, dict[str, Any]]
    predictions: pd.DataFrame
    classification_report: str
    tta: bool = False
    figures: dict[str, Path] = field(default_factory=dict)
    images: np.ndarray | None = field(default=None, repr=False)  # the pixels scored, for the gallery
    localisation: dict[str, Any] | None = None  # heatmaps against expert boxes (fracdet.explain)
    lesions: dict[str, Any] | None = None  # a localiser's boxes against expert boxes (evaluation.lesions)
    boxes: list[list[ScoredBox]] | None = field(default=None, repr=False)  # a localiser's boxes per image
    lesion_data: LesionData | None = field(default=None, repr=False)  # the same, matched to the expert boxes
    stability: dict[str, Any] | None = None  # verdict changes under re-encoding (evaluation.stability)
    left_out_trained_on: dict[str, int] = field(default_factory=dict)  # files per split the model trained on

    @property
    def honest(self) -> bool:
        return self.selected_on != "test"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arch": self.arch,
            "split": self.split,
            "images": len(self.predictions),
            "fractures": int(self.predictions["label"].sum()),
            "checkpoint_selected_on": self.selected_on,
            "warning": None if self.honest else TEST_SELECTION_WARNING,
            "left_out_trained_on": self.left_out_trained_on,
            "tta": self.tta,
            "temperature": self.temperature,
            "thresholds_from": self.thresholds_from,
            "thresholds": self.thresholds,
            "default_operating_point": self.default_point,
            "operating_points": self.points,
            "roc_specificity_at_sensitivity": self.roc_specificity,
            "calibration": self.calibration,
            "subgroups": self.subgroups.to_dict(orient="records"),
            "classification_report": self.classification_report,
            "localisation": self.localisation,
            "lesions": self.lesions,
            "stability": self.stability,
        }


def evaluate(
    model: TrainedModel,
    table: pd.DataFrame,
    *,
    split: str = "test",
    cache: FeatureCache | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    tta: bool | None = None,
    stability: bool = False,
) -> Evaluation:
    """Measure ``model`` on the ``split`` rows of ``table``.

    Args:
        model: from :func:`fracdet.models.load`.
        table: sample table with a ``split`` column. Its ``val`` rows re-fit the temperature and
            thresholds (the same fit training stored, unless the split differs). With ``split="all"``
            (every row, e.g. another dataset) or ``"val"``, the model's stored ones are used. Files the model
            was trained on (by its split manifest) are neither scored nor fitted on, and are counted
            (:func:`fracdet.data.split.leave_out_trained_on`).
        n_boot: bootstrap resamples (of whole groups) for the 95% intervals.
        tta: average each image with its mirror image (``None``: as the model does, ``model.tta``).
        stability: also re-save every file in each :data:`fracdet.evaluation.stability.VARIANTS` and report how
            often the verdict at the default operating point flips (reads the files again at full size).
    """
    tta = model.tta if tta is None else tta
    size = model.preprocess.input_size
    present = sorted(table["split"].dropna().unique())
    table = leave_out_trained_on(table.assign(split="all") if split == "all" else table, model.splits_path,
                                 model=model.name)  # fmt: skip
    left_out = table.attrs["left_out_trained_on"]
    target = table[table["split"] == split]
    if target.empty:
        why = f" ({left_out[split]} left out: {model.name} was trained on them)" if left_out.get(split) else ""
        raise ValueError(f"no rows in split {split!r}{why}; splits present: {present}")
    target.attrs.update(table.attrs)
    pixels = load_pixels(target, size, cache=cache, desc=f"decoding {split}")
    margins, maps = model.outputs(pixels.images, tta=tta, progress_desc=f"scoring {split}")
    labels = pixels.table["label"].to_numpy(int)

    val = table[table["split"] == "val"] if split not in ("val", "all") else table.iloc[:0]
    if len(val):
        val.attrs.update(table.attrs)
        val_pixels = load_pixels(val, size, cache=cache, desc="decoding val")
        val_margins = model.margins(val_pixels.images, tta=tta, progress_desc="scoring val")
        val_labels = val_pixels.table["label"].to_numpy(int)
        temperature = fit_temperature(val_margins, val_labels)
        val_probs = probabilities(val_margins, temperature)
        thresholds = choose_thresholds(val_labels, val_probs)
        source = "val split of this evaluation"
    elif model.thresholds:
        temperature, thresholds, source = model.temperature, dict(model.thresholds), "stored with the model"
    else:
        raise ValueError("no validation rows to choose thresholds on, and the model stores none")
    if split == "val":
        log.warning("evaluating on the validation split, which also chose the thresholds: optimistic")

    probs = probabilities(margins, temperature)
    groups = pixels.table["group"].astype(str).to_numpy() if "group" in pixels.table else None
    moves = {}
    if len(val):  # the thresholds are estimates too: how test sensitivity/specificity move with them
        val_groups = val_pixels.table["group"].astype(str).to_numpy() if "group" in val_pixels.table else None
        moves = threshold_choice_intervals(val_labels, val_probs, labels, probs, choose_thresholds,
                                           groups=val_groups, n_boot=n_boot, seed=seed)  # fmt: skip
    points = {}
    for name in (n for n in OPERATING_POINTS if n in thresholds):  # 0.3.0 and earlier stored no spec95
        values = binary_metrics(labels, probs, thresholds[name])
        values["ci95"] = bootstrap_intervals(labels, probs, thresholds[name], groups=groups, n_boot=n_boot, seed=seed)
        if name in moves:
            values["threshold_choice_ci95"] = moves[name]
        points[name] = values
    default = model.operating_point if model.operating_point in points else "sens90"
    roc_specificity = {}
    for target_sens in ROC_SENSITIVITIES:
        statistic = partial(specificity_at_sensitivity, sensitivity=target_sens)
        ci = bootstrap_interval(statistic, labels, probs, groups=groups, n_boot=n_boot, seed=seed)
        roc_specificity[f"{target_sens:.2f}"] = {"specificity": statistic(labels, probs), "ci95": ci}
    raw = probabilities(margins, 1.0)
    calibration = {
        "ece_before": expected_calibration_error(labels, raw),
        "ece_after": expected_calibration_error(labels, probs),
        "reliability_before": reliability_bins(labels, raw),
        "reliability_after": reliability_bins(labels, probs),
    }
    predictions = pixels.table[[c for c in ("path", "label", "group", *SUBGROUP_COLUMNS, "boxes")
                                if c in pixels.table]].copy()  # fmt: skip
    predictions["probability"] = probs
    predictions["margin"] = margins
    predictions["predicted"] = (probs >= thresholds[default]).astype(int)
    report = classification_report(
        labels, predictions["predicted"], labels=[0, 1], target_names=["no fracture", "fracture"], zero_division=0
    )
    result = Evaluation(
        model=model.name,
        arch=model.arch,
        split=split,
        selected_on=str(model.meta.get("selected_on", "val")),
        temperature=temperature,
        thresholds=thresholds,
        thresholds_from=source,
        default_point=default,
        points=points,
        calibration=calibration,
        subgroups=subgroup_metrics(predictions, thresholds[default]),
        roc_specificity=roc_specificity,
        predictions=predictions,
        classification_report=report,
        tta=tta,
        images=pixels.images,
        left_out_trained_on=left_out,
    )
    if stability:  # the files scored above (unreadable ones are not in pixels.table), against their probabilities
        result.stability = verdict_stability(model, absolute_paths(pixels.table), groups, threshold=thresholds[default],
                                             temperature=temperature, tta=tta, reference=probs, n_boot=n_boot,
                                             seed=seed)  # fmt: skip
    if maps is not None:  # a localiser: its boxes, scored with this evaluation's calibration
        boxes = scores_from_outputs(margins, maps, temperature=temperature, thresholds=thresholds,
                                    peak_weight=model.peak_weight, relative=model.box_relative).boxes  # fmt: skip
        result.boxes = boxes
        if "boxes" in pixels.table:
            result.lesions, result.lesion_data = _lesion_report(predictions, boxes, level_thresholds(thresholds),
                                                                n_boot, seed)  # fmt: skip
    return result


def _lesion_report(
    predictions: pd.DataFrame, boxes: list[list[ScoredBox]], levels: dict[str, float], n_boot: int, seed: int
) -> tuple[dict[str, Any], LesionData]:
    """Lesion-level figures on all images and on images without surgical hardware, and by subgroup."""
    experts = [[tuple(b) for b in (bs if isinstance(bs, list) else [])] for bs in predictions["boxes"]]

    def measure(rows: np.ndarray) -> tuple[dict[str, Any], LesionData]:
        part = predictions.iloc[rows]
        data = LesionData.build(part["label"].to_numpy(), part["probability"].to_numpy(), [boxes[i] for i in rows],
                                [experts[i] for i in rows], part["group"].astype(str).to_numpy())  # fmt: skip
        figures = lesion_metrics(data, levels, n_boot=n_boot, n_boot_map=min(n_boot, 200), seed=seed)
        labels = part["label"].to_numpy()
        auc = binary_metrics(labels, part["probability"].to_numpy(), 0.5)["auc"]
        ci = bootstrap_interval(lambda y, p: binary_metrics(y, p, 0.5)["auc"], labels, part["probability"].to_numpy(),
                                groups=part["group"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)  # fmt: skip
        return {"images": len(part), "fractures": int(labels.sum()), "image_auc": {"value": auc, "ci95": list(ci)},
                **figures}, data  # fmt: skip

    everything, data = measure(np.arange(len(predictions)))
    report: dict[str, Any] = {"levels": levels, "all": everything}
    if "hardware" in predictions and predictions["hardware"].notna().any():
        report["without_hardware"], _ = measure(np.flatnonzero(~predictions["hardware"].fillna(False).astype(bool)))
    per_image = lesion_table(data, levels, predictions)
    report["subgroups"] = _lesion_subgroups(per_image, levels)
    return report, data


def _lesion_subgroups(per_image: pd.DataFrame, levels: dict[str, float]) -> list[dict[str, Any]]:
    """Localised sensitivity (both hit rules) at the suspicious level per fracture size, region, hardware."""
    level = "suspicious" if "suspicious" in levels else next(iter(levels), None)
    rows: list[dict[str, Any]] = []
    if level is None:
        return rows
    for column in ("fracture_size", "region", "hardware"):
        if column not in per_image or per_image[column].isna().all():
            continue
        parts = per_image.groupby(per_image[column].astype(object).fillna("unknown"))
        for value, part in sorted(parts, key=lambda kv: (_SIZE_ORDER.get(kv[0], len(_SIZE_ORDER)), str(kv[0]))):
            name = ("yes" if value else "no") if isinstance(value, (bool, np.bool_)) else str(value)
            rows.append({"by": column, "value": name, "fractures": len(part), "level": level,
                         "flagged": float(part[f"flagged@{level}"].mean()),
                         "localised_iou": float(part[f"localised_iou@{level}"].mean()),
                         "localised_centre": float(part[f"localised_centre@{level}"].mean())})  # fmt: skip
    return rows


def subgroup_metrics(predictions: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Counts, sensitivity, specificity and AUC per body region, view, surgical hardware and fracture size.

    A fracture-size row holds the fractures of that size against all images without fracture, so its AUC says
    how well those fractures are ranked above normal images and its specificity is the overall one.
    """
    rows = []
    negatives = predictions[predictions["label"] == 0]
    for column in SUBGROUP_COLUMNS:
        if column not in predictions or predictions[column].isna().all():
            continue
        fracture_only = column in _FRACTURE_ONLY
        groups = predictions[predictions["label"] == 1] if fracture_only else predictions
        parts = groups.groupby(groups[column].astype(object).fillna("unknown"))
        for value, part in sorted(parts, key=lambda kv: (_SIZE_ORDER.get(kv[0], len(_SIZE_ORDER)), str(kv[0]))):
            if fracture_only:
                part = pd.concat([part, negatives])
            m = binary_metrics(part["label"].to_numpy(), part["probability"].to_numpy(), threshold)
            name = ("yes" if value else "no") if isinstance(value, (bool, np.bool_)) else str(value)
            rows.append(
                {"by": column, "value": name, "images": len(part), "fractures": int(part["label"].sum()),
                 "sensitivity": m["sensitivity"], "specificity": m["specificity"], "auc": m["auc"]}
            )  # fmt: skip
    return pd.DataFrame(rows, columns=["by", "value", "images", "fractures", "sensitivity", "specificity", "auc"])


def write_report(result: Evaluation, out_dir: str | Path, *, curves: Path | None = None) -> Path:
    """Write ``metrics.json``, ``predictions.csv``, the figures and ``report.html`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = result.images
    labels = result.predictions["label"].to_numpy()
    probs = result.predictions["probability"].to_numpy()
    default = result.points[result.default_point]
    name = f"{result.model} on {result.split}"
    figs = result.figures
    if len(np.unique(labels)) == 2:
        figs["roc"] = plots.plot_roc(labels, probs, result.points, out / "roc.png", title=f"ROC: {name}")
        figs["pr"] = plots.plot_pr(labels, probs, out / "pr.png", title=f"precision-recall: {name}")
    figs["confusion"] = plots.plot_confusion(
        default, out / "confusion.png", title=f"{result.default_point} (t={default['threshold']:.2f})"
    )
    figs["calibration"] = plots.plot_reliability(
        {"before scaling": result.calibration["reliability_before"],
         f"T={result.temperature:.2f}": result.calibration["reliability_after"]},
        out / "calibration.png", title="reliability",
    )  # fmt: skip
    if images is not None:
        figs["gallery"] = plots.plot_gallery(images, labels, probs, default["threshold"], out / "gallery.png")
    if result.lesion_data is not None and images is not None:
        figs.update(_lesion_figures(result, out))
    if result.stability:
        figs["stability"] = plots.plot_stability(result.stability, out / "stability.png",
                                                 title=f"verdict stability: {name}")  # fmt: skip
    if curves is not None and curves.is_file():
        figs["curves"] = curves
    write_json(out / "metrics.json", result.to_dict())
    table = result.predictions.drop(columns=["boxes"], errors="ignore")
    if result.boxes is not None:  # the boxes a reader is shown at the suspicious level, as JSON per image
        table["shown_boxes"] = [json.dumps([b.to_dict() for b in shown_boxes(bs)]) for bs in result.boxes]
    with atomic_file(out / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_text(out / "report.html", _html(result))
    return out / "report.html"


def _lesion_figures(result: Evaluation, out: Path) -> dict[str, Path]:
    """FROC curves and a gallery of hits, misses and the normal images the model ranks highest."""
    from fracdet.evaluation.lesions import froc_curve

    data, levels = result.lesion_data, result.lesions["levels"]
    figures = {"froc": plots.plot_froc({rule: froc_curve(data, rule) for rule in ("iou", "centre")}, out / "froc.png",
                                       title=f"FROC: {result.model} on {result.split}")}  # fmt: skip
    level = "suspicious" if "suspicious" in levels else None
    if level is None:
        return figures
    fractured = np.flatnonzero(data.labels == 1)
    found = {i: localised_sensitivity(data, np.array([i]), levels[level], "iou") == 1.0 for i in fractured}
    hit_rows = [i for i in fractured if found[i]][:4]
    miss_rows = [i for i in fractured if not found[i]][:4]
    normal_rows = list(np.flatnonzero(data.labels == 0)[np.argsort(-data.probabilities[data.labels == 0])][:4])
    rows = hit_rows + miss_rows + normal_rows
    captions = ([f"hit, p={data.probabilities[i]:.2f}" for i in hit_rows]
                + [f"missed, p={data.probabilities[i]:.2f}" for i in miss_rows]
                + [f"no fracture, p={data.probabilities[i]:.2f}" for i in normal_rows])  # fmt: skip
    figures["boxes"] = plots.plot_box_gallery(
        result.images[rows], [data.experts[i] for i in rows], [shown_boxes(data.boxes[i]) for i in rows], captions,
        out / "boxes.png", title=f"fractured images found (hit: IoU >= 0.25 at {level}) and missed; the highest-"
        "ranked normal images",
    )  # fmt: skip
    return figures


def metrics_table(result: Evaluation) -> pd.DataFrame:
    """One row per operating point: each metric as ``value [low, high]``."""
    rows = []
    for name, m in result.points.items():
        row = {"operating point": name, "threshold": f"{m['threshold']:.3f}"}
        for metric in METRICS:
            lo, hi = m["ci95"][metric]
            row[metric] = f"{m[metric]:.3f} [{lo:.3f}, {hi:.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


_CSS = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}
table{border-collapse:collapse;font-size:90%} td,th{border:1px solid #ccc;padding:3px 6px}
.warn{background:#fdd;border:2px solid #c00;padding:.6em;font-weight:bold}
figure{display:inline-block;max-width:48%;margin:.5em;vertical-align:top} pre{background:#f6f6f6;padding:.5em}"""


def _localisation_html(loc: dict[str, Any] | None) -> str:
    if not loc:
        return ""
    other = loc.get("compare")
    head = f"<th>{html.escape(other['model'])} Grad-CAM</th>" if other else ""

    def cell(key: str) -> str:
        return f"<td>{other[key]:.3f}</td>" if other else ""

    return f"""<h2>Where the model looked ({html.escape(str(loc["method"]))}, {loc["images"]} fractured images with
expert boxes)</h2><table><tr><th></th><th>heatmap</th><th>centre baseline</th>{head}</tr>
<tr><td>pointing game (maximum inside an expert box)</td><td>{loc["pointing_game"]:.3f}</td>
<td>{loc["centre_pointing_game"]:.3f}</td>{cell("pointing_game")}</tr>
<tr><td>mean IoU of the derived box with the best expert box</td><td>{loc["iou"]:.3f}</td>
<td>{loc["centre_iou"]:.3f}</td>{cell("iou")}</tr></table>"""


def lesion_summary(lesions: dict[str, Any], part: str = "all") -> pd.DataFrame:
    """The lesion-level figures of one part (``all`` or ``without_hardware``) as ``value [low, high]`` rows."""
    rows = []
    for key, entry in lesions.get(part, {}).items():
        if isinstance(entry, dict) and "value" in entry:
            lo, hi = entry["ci95"]
            rows.append({"figure": key, "value": f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"})
    return pd.DataFrame(rows, columns=["figure", "value"])


def _lesions_html(lesions: dict[str, Any] | None) -> str:
    if not lesions:
        return ""
    levels = ", ".join(f"{name} {value:.3f}" for name, value in lesions["levels"].items())
    parts = "".join(
        f"<h3>{html.escape(title)} ({lesions[part]['images']} images, {lesions[part]['fractures']} fractured)</h3>"
        + lesion_summary(lesions, part).to_html(index=False)
        for part, title in (("all", "All images"), ("without_hardware", "Images without surgical hardware"))
        if part in lesions
    )
    subgroups = pd.DataFrame(lesions.get("subgroups", [])).to_html(index=False, float_format="%.3f")
    return f"""<h2>Where: the localiser's boxes against the expert boxes</h2>
<p>Levels (probability thresholds chosen on validation): {html.escape(levels)}. A box hits an expert box when
their IoU is at least 0.25 (<code>iou</code>) or when its centre lies inside it (<code>centre</code>).
<code>froc_RULE@R</code>: share of expert fractures hit at R false-positive boxes per image;
<code>localised_sensitivity_RULE@LEVEL</code>: fractured images flagged at the level with a shown box (at most 3)
hitting an expert box; <code>false_boxes_per_normal@LEVEL</code>: boxes shown per image without fracture;
<code>map50</code>/<code>map</code>: COCO box mAP at IoU 0.5 and 0.5:0.95 (torchmetrics), on all images and on
fractured ones only. Intervals: 95% bootstrap over groups.</p>{parts}
<h3>Fractured images found, by subgroup</h3>{subgroups}"""


def _threshold_choice_html(result: Evaluation) -> str:
    rows = {name: m["threshold_choice_ci95"] for name, m in result.points.items() if "threshold_choice_ci95" in m}
    if not rows:
        return ""
    cells = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{ci[k][0]:.3f} – {ci[k][1]:.3f}</td>" for k in ("threshold", "sensitivity", "specificity"))
        + "</tr>"
        for name, ci in rows.items()
    )
    return f"""<p>The intervals above hold each threshold fixed. Each threshold is itself an estimate from the
validation split; had validation held other patients (95% bootstrap over its groups, temperature fixed), the
thresholds and what they give on this split would range over:</p>
<table><tr><th>operating point</th><th>threshold</th><th>sensitivity</th><th>specificity</th></tr>{cells}</table>"""


def _roc_html(result: Evaluation) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(sens)}</td><td>{r['specificity']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]</td></tr>"
        for sens, r in result.roc_specificity.items()
    )
    return f"""<p>Read off this split's own ROC curve (threshold-free like the AUC; nothing is chosen with it):
the best specificity any threshold reaches at each sensitivity. Set beside the specificity at the
validation-chosen threshold, it separates what the ranking costs from what carrying the threshold over costs.</p>
<table><tr><th>sensitivity</th><th>specificity on the ROC</th></tr>{cells}</table>"""


def stability_table(stability: dict[str, Any]) -> pd.DataFrame:
    """One row per re-encoding variant: flip rate with its interval and the probability changes."""
    rows = []
    for name, v in stability["variants"].items():
        lo, hi = v["flip_rate_ci95"]
        flips = f"{v['flips']}, {v['flips_near_threshold']} near" if "flips_near_threshold" in v else v["flips"]
        clear = v.get("flip_rate_not_borderline")
        rows.append({"variant": name, "verdict flips": f"{v['flip_rate']:.3f} [{lo:.3f}, {hi:.3f}] ({flips})",
                     "flips, not borderline": "-" if clear is None else f"{clear:.3f}",
                     "median |dp|": f"{v['median_abs_change']:.4f}", "p90 |dp|": f"{v['p90_abs_change']:.4f}",
                     "max |dp|": f"{v['max_abs_change']:.3f}"})  # fmt: skip
    return pd.DataFrame(rows)


def _stability_html(stability: dict[str, Any] | None) -> str:
    if not stability:
        return ""
    near = f"<p>{html.escape(line)}</p>" if (line := near_line(stability)) else ""
    return (f"<h2>Verdict stability ({stability['images']} images re-saved; flips at threshold "
            f"{stability['threshold']:.3f})</h2>{near}" + stability_table(stability).to_html(index=False))  # fmt: skip


def near_line(stability: dict[str, Any]) -> str:
    """How many files score near the threshold: what the flips are made of (reports before it lack the count)."""
    if "near_threshold" not in stability:
        return ""
    return (
        f"{stability['near_threshold']} of {stability['images']} files score within "
        f"{stability['near_logits']:g} logit of the threshold; a flip needs a change that crosses it, so "
        "the flip rate follows their number as well as the size of the changes. Their verdicts are the ones "
        "the reader is told are borderline"
    )


def _html(result: Evaluation) -> str:
    warn = "" if result.honest else f'<p class="warn">{html.escape(TEST_SELECTION_WARNING)}</p>'
    cal = result.calibration
    figures = "".join(f"<figure>{_img(p)}<figcaption>{html.escape(k)}</figcaption></figure>"
                      for k, p in result.figures.items())  # fmt: skip
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fracdet evaluation: {html.escape(result.model)} on {html.escape(result.split)}</title>
<style>{_CSS}</style>
</head><body>
<h1>{html.escape(result.model)} ({html.escape(result.arch)}) on the {html.escape(result.split)} split</h1>
{warn}
<p>{len(result.predictions)} images, {int(result.predictions["label"].sum())} with fractures.
Thresholds and temperature (T = {result.temperature:.3f}) from: {html.escape(result.thresholds_from)}.
Test-time augmentation: {"on" if result.tta else "off"}. Intervals: 95% bootstrap over groups of copies.</p>
<h2>Metrics at each operating point</h2>{metrics_table(result).to_html(index=False)}
{_threshold_choice_html(result)}
{_roc_html(result)}
<h2>Classification report ({html.escape(result.default_point)})</h2>
<pre>{html.escape(result.classification_report)}</pre>
<h2>Calibration</h2><p>Expected calibration error {cal["ece_before"]:.3f} before and {cal["ece_after"]:.3f}
after temperature scaling.</p>
<h2>Subgroups ({html.escape(result.default_point)})</h2>
{result.subgroups.to_html(index=False, float_format="%.3f")}
{_lesions_html(result.lesions)}
{_localisation_html(result.localisation)}
{_stability_html(result.stability)}
<h2>Figures</h2>{figures}
</body></html>"""
