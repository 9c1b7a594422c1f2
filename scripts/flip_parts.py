"""Which part of a fused localiser makes its verdict flip when a radiograph is re-saved (issue 16)?

    python scripts/flip_parts.py MODEL --data DATASET [--split val] [--out FILE.json]

A fused localiser (:class:`fracdet.models.FusedLocaliser`) scores an image as a weighted sum of parts: its
classifier head's logit, its map's peak and each classifier's logit margin. For every file of the split and
every variant of :data:`fracdet.evaluation.stability.VARIANTS`, each part is scored on the file as read and
on the variant. Printed per variant and part: the part's share of the variance of the fused logit's change
(the covariance of its weighted change with the total, over the total's variance: the shares add up to 1),
its mean signed change (a systematic shift, not noise) and median absolute change (in the part's own
logits; ``spread``: each part's standard deviation on the files as read), and the verdict flips at the
model's threshold if that part alone held still (the others moving as measured). Read on validation: no
test image is needed to find where a fix must go.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import logit

from _split_scripts import model_and_rows, report, split_parser
from fracdet.data.table import absolute_paths
from fracdet.evaluation.stability import VARIANTS, resaved
from fracdet.models import FusedLocaliser
from fracdet.models.predict import normalise


@torch.no_grad()
def fusion_parts(net: FusedLocaliser, images: np.ndarray, preprocess, batch: int = 32) -> np.ndarray:
    """``(N, P)``: :meth:`FusedLocaliser.fusion_inputs` of uint8 images at the model's input side."""
    rows = [net.fusion_inputs(normalise(torch.from_numpy(images[k : k + batch]).unsqueeze(1), preprocess)).numpy()
            for k in range(0, len(images), batch)]  # fmt: skip
    return np.concatenate(rows).astype(np.float64)


def main() -> None:
    args = split_parser(__doc__).parse_args()
    model, rows = model_and_rows(args, needed_for="to re-save")
    net = model.module.eval()
    if not isinstance(net, FusedLocaliser):
        raise SystemExit(f"{args.model} is not a fused localiser: it has no parts to weigh")
    _, images = resaved(list(absolute_paths(rows)), model.preprocess.input_size)
    parts = {name: fusion_parts(net, stack, model.preprocess) for name, stack in images.items()}
    weights = net.fusion.detach().double().numpy()
    # The verdict compares the calibrated probability with the threshold: in logits, margin / T >= logit(t).
    cut = float(logit(model.threshold)) * model.temperature
    before = parts["original"] @ weights
    out = {"model": f"{model.name} {model.version}", "split": args.split, "images": len(before),
           "threshold": model.threshold, "weights": dict(zip(net.fusion_names, weights.tolist(), strict=True)),
           "spread": {part: float(parts["original"][:, k].std()) for k, part in enumerate(net.fusion_names)
                      if part != "bias"},
           "variants": {}}  # fmt: skip
    for name in VARIANTS:
        change = (parts[name] - parts["original"]) * weights
        total = change.sum(axis=1)
        after = before + total
        flipped = (after >= cut) != (before >= cut)
        figures = {"flip_rate": float(flipped.mean()), "flips_to_fracture": int((flipped & (after >= cut)).sum()),
                   "flips_to_none": int((flipped & (after < cut)).sum()), "parts": {}}  # fmt: skip
        for k, part in enumerate(net.fusion_names):
            if part == "bias":
                continue
            held = before + total - change[:, k]
            figures["parts"][part] = {
                "variance_share": float(np.cov(change[:, k], total)[0, 1] / total.var()) if total.var() else 0.0,
                "mean_change": float((parts[name] - parts["original"])[:, k].mean()),
                "median_abs_change": float(np.median(np.abs(parts[name] - parts["original"])[:, k])),
                "flip_rate_if_still": float(np.mean((held >= cut) != (before >= cut))),
            }
        out["variants"][name] = figures
    report(out, args.out)


if __name__ == "__main__":
    main()
