"""Does the audit group copies of a radiograph made under any rotation, flip, crop and re-encoding?

    python benchmarks/audit_rotations.py [--data samples/fracatlas] [--step 15] \
        [--near KEY=VALUE ...] [--out benchmarks/results-audit-rotations.json]

Augmentation tools write rotated copies on the original canvas: the corners of the radiograph are cut
away and black triangles fill the new corners. From every image of the dataset (the bundled sample by
default) this writes such a copy at every ``step`` degrees from 0 to 360, each also mirrored at random,
cropped by up to 10% per side, rescaled by 0.6-1.2 and saved as JPEG (quality 60-95) or PNG (seed 0),
into a temporary class-folder dataset, and runs the audit's duplicate search on it with a cold cache
(``--near``: another setting of :class:`fracdet.data.neardup.NearDuplicateConfig`, to try a knob).

Reports, against the truth (copy -> its original):

* *group recall*: the share of originals whose every copy lands in the original's near-duplicate group;
* *copy recall*: the share of copies grouped with their original;
* *group precision*: the share of found groups that hold copies of one original only (originals that the
  audit already joins as one radiograph count as one);
* the time of the search, and its recall per angle (a picture: ``--plot``);
* per original not grouped whole (``split_originals``): the angles of the copies left out of the unturned
  copy's group, and the share of its copies in its largest group (high when the copies found each other
  but not the unturned one); and, for the unturned copy and each left-out copy (``left_out``, the unturned
  first), why: how many embedding candidates it
  had among the copies of its own original, and its best match with one of them (ORB inliers, tile
  mismatch, mirrored, confirmed), against the knobs that decide (``min_inliers``/``flipped_inliers``,
  ``max_mismatch``).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from fracdet.data import load_dataset
from fracdet.data.duplicates import DuplicateConfig, find_duplicates
from fracdet.data.table import absolute_paths

CLASS_FOLDERS = {0: "not fractured", 1: "fractured"}


def augmented_copy(image: Image.Image, degrees: float, rng: np.random.Generator) -> bytes:
    """Rotate on the same canvas (cut corners), maybe mirror, crop, rescale and re-encode ``image``."""
    grey = image.convert("L")
    if rng.random() < 0.5:
        grey = grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    grey = grey.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=0)
    w, h = grey.size
    left, top, right, bottom = (rng.uniform(0, 0.1, 4) * [w, h, w, h]).astype(int)
    grey = grey.crop((left, top, w - right, h - bottom))
    scale = rng.uniform(0.6, 1.2)
    grey = grey.resize(
        (max(16, round(grey.width * scale)), max(16, round(grey.height * scale))), Image.Resampling.LANCZOS
    )
    buffer = io.BytesIO()
    if rng.random() < 0.7:
        grey.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    else:
        grey.save(buffer, format="PNG")
    return buffer.getvalue()


def make_copies(data: Path, out: Path, step: float, seed: int) -> pd.DataFrame:
    """Write the copies under ``out/<label>/``; return one row per copy: path, original, angle."""
    table = load_dataset(data)
    rng = np.random.default_rng(seed)
    rows = []
    for k, (path, label) in enumerate(zip(absolute_paths(table), table["label"], strict=True)):
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except OSError:  # the sample's deliberately truncated files: no copies of them
            continue
        for angle in np.arange(0, 360, step):
            data_bytes = augmented_copy(image, float(angle), rng)
            suffix = ".jpg" if data_bytes[:2] == b"\xff\xd8" else ".png"
            name = f"{CLASS_FOLDERS[label]}/orig{k:04d}_rot{int(angle):03d}{suffix}"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data_bytes)
            rows.append((name, k, float(angle)))
    return pd.DataFrame(rows, columns=["path", "original", "angle"])


def why_left_out(truth: pd.DataFrame, table: pd.DataFrame, found, groups: pd.Series) -> dict[str, list[dict]]:
    """Per original not grouped whole, each left-out copy's candidates among its own original's copies and
    its best match with them (the diagnosis of docs/RELIABILITY.md)."""
    sha = pd.Series(found.files["sha256"].to_numpy(), index=table["path"].to_numpy())
    shas = list(found.features.props.index)
    index = {s: k for k, s in enumerate(shas)}
    pairs = found.pairs
    frame = truth.assign(group=truth["path"].map(groups), content=truth["path"].map(sha).map(index))
    anchor = frame[frame["angle"] == 0].set_index("original")["group"]
    out: dict[str, list[dict]] = {}
    for original, copies in frame.groupby("original"):
        left = copies[copies["group"].to_numpy() != anchor[original]]
        if left.empty:
            continue
        own = set(copies["content"])
        rows = []
        unturned = copies[copies["angle"] == 0]  # first: the copy the others are measured against
        for _, copy in pd.concat([unturned, left]).iterrows():
            k = copy["content"]
            mine = pairs[((pairs["i"] == k) & pairs["j"].isin(own)) | ((pairs["j"] == k) & pairs["i"].isin(own))]
            tried = mine[mine["inliers"] >= 0]
            best = tried.loc[tried["inliers"].idxmax()] if len(tried) else None
            rows.append({
                "angle": float(copy["angle"]),
                "candidates_with_own_copies": len(mine),
                "best_inliers": int(best["inliers"]) if best is not None else None,
                "best_mismatch": round(float(best["mismatch"]), 3) if best is not None else None,
                "best_flipped": bool(best["flipped"]) if best is not None else None,
                "best_confirmed": bool(best["confirmed"]) if best is not None and pd.notna(best["confirmed"]) else None,
            })  # fmt: skip
        out[str(original)] = rows
    return out


def score(truth: pd.DataFrame, groups: pd.Series, original_groups: pd.Series) -> dict:
    """Recall and precision of ``groups`` (copy path -> found group) against ``truth``.

    ``original_groups`` maps each original to the group the audit gives it among the originals alone:
    originals it already treats as one radiograph are one radiograph here too.
    """
    frame = truth.assign(group=truth["path"].map(groups), radiograph=truth["original"].map(original_groups))
    anchor = frame[frame["angle"] == 0].set_index("original")["group"]  # the unrotated copy stands for it
    frame["with_original"] = frame["group"].to_numpy() == frame["original"].map(anchor).to_numpy()
    per_original = frame.groupby("original")["with_original"].all()
    purity = frame.groupby("group")["radiograph"].nunique()
    per_angle = frame.groupby("angle")["with_original"].mean()
    split = {}
    for original, copies in frame.groupby("original"):
        if not per_original[original]:
            split[str(original)] = {
                "left_out_angles": [float(a) for a in copies.loc[~copies["with_original"], "angle"]],
                "largest_group_share": round(float(copies["group"].value_counts().iloc[0] / len(copies)), 3),
            }
    return {
        "originals": int(truth["original"].nunique()),
        "copies": len(truth),
        "group_recall": float(per_original.mean()),
        "copy_recall": float(frame["with_original"].mean()),
        "groups_found": int(purity.size),
        "group_precision": float((purity == 1).mean()),
        "merged_groups": int((purity > 1).sum()),
        "recall_per_angle": {f"{a:g}": round(float(r), 4) for a, r in per_angle.items()},
        "split_originals": split,
    }


def run(data: Path, step: float, seed: int, near: dict | None = None) -> dict:
    from fracdet.data.neardup import NearDuplicateConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "copies"
        truth = make_copies(data, root, step, seed)
        config = DuplicateConfig(cache_dir=str(Path(tmp) / "cache"), near=NearDuplicateConfig(**(near or {})))
        originals = find_duplicates(load_dataset(data), config).files["near_group"].reset_index(drop=True)
        table = load_dataset(root)
        start = time.perf_counter()
        found = find_duplicates(table, config)
        seconds = time.perf_counter() - start
    groups = pd.Series(found.files["near_group"].to_numpy(), index=table["path"].to_numpy())
    result = score(truth, groups, originals)
    for original, left in why_left_out(truth, table, found, groups).items():
        result["split_originals"][original]["left_out"] = left
    return {"data": str(data), "step_degrees": step, "seed": seed, "near": near or {},
            "search_seconds": round(seconds, 1), **result}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    from _figures import pyplot, save  # run as a script: benchmarks/ is on the path

    plt = pyplot()

    angles = [float(a) for a in result["recall_per_angle"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(angles, list(result["recall_per_angle"].values()), width=result["step_degrees"] * 0.8)
    ax.set(xlabel="rotation of the copy (degrees)", ylabel="copies grouped with original", ylim=(0, 1.05))
    ax.set_title(f"audit on rotated copies: group recall {result['group_recall']:.3f}, precision "
                 f"{result['group_precision']:.3f}")  # fmt: skip
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("samples/fracatlas"))
    parser.add_argument("--step", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--near",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a NearDuplicateConfig setting other than the default, e.g. flipped_inliers=15",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    near = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.near)}
    result = run(args.data, args.step, args.seed, near)
    print(json.dumps({k: v for k, v in result.items() if k not in ("recall_per_angle", "split_originals")}, indent=2))
    for original, found in result["split_originals"].items():
        print(
            f"original {original}: {found['largest_group_share']:.0%} of its copies in one group; left out of the "
            f"unturned copy's group: {found['left_out_angles']}"
        )
        for copy in found.get("left_out", []):
            print(f"    {copy['angle']:5.0f} deg: {copy['candidates_with_own_copies']} candidates with its own copies; "
                  f"best match {copy['best_inliers']} inliers, mismatch {copy['best_mismatch']}, "
                  f"mirrored {copy['best_flipped']}, confirmed {copy['best_confirmed']}")  # fmt: skip
    print("recall per angle:", result["recall_per_angle"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
