"""Check the near-duplicate detector against pairs a person inspected by eye.

    python scripts/near_duplicate_review.py sample --out docs/evidence/review --name review
    (look at review_*.jpg and fill the column ``eye`` of review.csv: copy / different)
    python scripts/near_duplicate_review.py inspect docs/evidence/review/review.csv --pairs 12 37 --out DIR
    (full-resolution pairs with their difference image, for pairs the thumbnails leave in doubt)
    python scripts/near_duplicate_review.py score docs/evidence/review/review.csv

``sample`` draws candidate pairs (embedding neighbours) in three strata (within multiregion, within
FracAtlas, multiregion against FracAtlas), half of each stratum confirmed by the detector and half not,
preferring pairs near the decision boundary, and draws them *without* the detector's verdict so the
eye is not led; ``--exclude`` leaves out pairs reviewed before, so a new draw is a held-out test.
``score`` re-runs the detector on every reviewed pair and reports precision and recall.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from fracdet.data import DuplicateConfig, find_duplicates, load_dataset, read_image
from fracdet.data.duplicates import Duplicates
from fracdet.data.montage import save_pair_montage
from fracdet.data.neardup import KeypointCache, confirm_pairs, match_thumbnails, view_candidate_pairs

STRATA = {  # name: (dataset a, dataset b or None, confirmed pairs, rejected pairs)
    "multiregion": ("multiregion", None, 40, 40),
    "fracatlas": ("fracatlas", None, 30, 40),
    "cross": ("multiregion", "fracatlas", 25, 25),
}


def _load(shared: Path, name: str, config: DuplicateConfig) -> tuple[pd.DataFrame, Duplicates]:
    table = load_dataset(shared / name)
    return table, find_duplicates(table, config)


def _first_paths(table: pd.DataFrame, dups: Duplicates) -> pd.Series:
    return pd.Series(table["path"].to_numpy()).groupby(dups.files["exact_group"].to_numpy()).first()


def _draw(checked: pd.DataFrame, n_yes: int, n_no: int, rng: np.random.Generator) -> pd.DataFrame:
    """Half of each side nearest the decision boundary, half at random."""
    yes = checked[checked["confirmed"] == True]  # noqa: E712
    no = checked[checked["confirmed"] == False]  # noqa: E712
    hard_yes = yes.sort_values(["mismatch", "inliers"], ascending=[False, True]).head(n_yes // 2)
    rest_yes = yes.drop(hard_yes.index)
    hard_no = no.sort_values(["inliers", "similarity"], ascending=False).head(n_no // 2)
    rest_no = no.drop(hard_no.index)
    picks = [
        hard_yes,
        rest_yes.iloc[rng.permutation(len(rest_yes))[: n_yes - len(hard_yes)]],
        hard_no,
        rest_no.iloc[rng.permutation(len(rest_no))[: n_no - len(hard_no)]],
    ]
    return pd.concat(picks)


def cmd_sample(args: argparse.Namespace) -> None:
    config = DuplicateConfig()
    rng = np.random.default_rng(args.seed)
    loaded = {name: _load(args.shared, name, config) for name in ("multiregion", "fracatlas")}
    seen: set[tuple[str, str]] = set()
    if args.exclude:
        old = pd.read_csv(args.exclude)
        seen = set(zip(old["path_a"], old["path_b"], strict=True))
    rows = []
    for stratum, (name_a, name_b, n_yes, n_no) in STRATA.items():
        table_a, dups_a = loaded[name_a]
        table_b, dups_b = loaded[name_b or name_a]
        feats_a, feats_b = dups_a.features, dups_b.features
        if name_b is None:
            cands = view_candidate_pairs(feats_a.views, None, config.near)
        else:
            cands = view_candidate_pairs(feats_a.views, feats_b.views, config.near)
        cands = cands[cands["similarity"] < 0.9999].reset_index(drop=True)  # exact copies need no eye
        thumbs = {**feats_a.thumbnails, **feats_b.thumbnails}
        checked = confirm_pairs(cands, list(feats_a.props.index), list(feats_b.props.index), thumbs, config.near)
        paths_a, paths_b = _first_paths(table_a, dups_a), _first_paths(table_b, dups_b)
        if seen:
            keys = [(paths_a[i], paths_b[j]) for i, j in zip(checked["i"], checked["j"], strict=True)]
            checked = checked[[k not in seen and k[::-1] not in seen for k in keys]]
        drawn = _draw(checked, round(n_yes * args.fraction), round(n_no * args.fraction), rng)
        for r in drawn.itertuples():
            rows.append({
                "stratum": stratum, "dataset_a": name_a, "path_a": paths_a[r.i],
                "dataset_b": name_b or name_a, "path_b": paths_b[r.j], "similarity": round(r.similarity, 4),
            })  # fmt: skip
    review = pd.DataFrame(rows).sample(frac=1, random_state=args.seed).reset_index(drop=True)
    review.insert(0, "pair", np.arange(1, len(review) + 1))
    review["eye"] = ""
    args.out.mkdir(parents=True, exist_ok=True)
    review.to_csv(args.out / f"{args.name}.csv", index=False)
    sha = {name: dict(zip(t["path"], d.files["sha256"], strict=True)) for name, (t, d) in loaded.items()}
    thumbs = {**loaded["multiregion"][1].features.thumbnails, **loaded["fracatlas"][1].features.thumbnails}
    for page, start in enumerate(range(0, len(review), 20), 1):
        chunk = review.iloc[start : start + 20]
        pairs = [
            (thumbs.get(sha[r.dataset_a][r.path_a]), thumbs.get(sha[r.dataset_b][r.path_b]), f"#{r.pair}")
            for r in chunk.itertuples()
        ]
        out = args.out / f"{args.name}_{page:02d}.jpg"
        save_pair_montage(out, pairs, columns=4, title=f"review page {page}", tile=256)
    print(f"wrote {args.out / args.name}.csv ({len(review)} pairs) and {page} montages")


def cmd_score(args: argparse.Namespace) -> None:
    config = DuplicateConfig()
    review = pd.read_csv(args.review)
    if not review["eye"].isin(["copy", "different"]).all():
        raise SystemExit("every row needs eye = copy or different")
    names = set(review["dataset_a"]) | set(review["dataset_b"])
    # Without --groups only the reviewed pairs are matched; with it, the full search runs once per dataset.
    search = DuplicateConfig(near_duplicates=args.groups)
    loaded = {name: _load(args.shared, name, search) for name in names}
    sha = {name: dict(zip(t["path"], d.files["sha256"], strict=True)) for name, (t, d) in loaded.items()}
    thumbs = {k: v for _, d in loaded.values() for k, v in d.features.thumbnails.items()}
    keypoints = KeypointCache(thumbs)
    verdicts, matches = [], []
    for r in review.itertuples():
        match = match_thumbnails(keypoints, sha[r.dataset_a][r.path_a], sha[r.dataset_b][r.path_b], config.near)
        verdicts.append(match.confirms(config.near))
        matches.append(match)
    review["detector"] = np.where(verdicts, "copy", "different")
    _print_third_tier(review, matches, config)
    truth, said = review["eye"] == "copy", review["detector"] == "copy"
    tp, fp, fn = int((truth & said).sum()), int((~truth & said).sum()), int((truth & ~said).sum())
    print(f"{len(review)} reviewed pairs: {int(truth.sum())} copies, {int((~truth).sum())} different radiographs")
    print(f"detector: {tp} true copies found, {fp} false alarms, {fn} missed")
    print(f"precision {tp / max(tp + fp, 1):.3f}, recall {tp / max(tp + fn, 1):.3f}")
    print(pd.crosstab([review["stratum"], review["eye"]], review["detector"]).to_string())
    if args.groups:
        _score_groups(loaded, review)
    disagreements = review[truth != said]
    if len(disagreements):
        columns = ["pair", "stratum", "path_a", "path_b", "eye", "detector"]
        print("disagreements:\n" + disagreements[columns].to_string())


def _print_third_tier(review: pd.DataFrame, matches: list, config: DuplicateConfig) -> None:
    """How close the pairs a person called different come to the third tier (pixels that agree everywhere
    once the alignment is refined): their lowest refined median and 90th percentile of the tile mismatch."""
    near = config.near
    refined = [(r.eye, m) for r, m in zip(review.itertuples(), matches, strict=True) if m.refined]
    different = [m for eye, m in refined if eye == "different" and m.inliers >= near.pixel_min_inliers]
    copies = [m for eye, m in refined if eye == "copy" and m.confirms(near)]
    print(
        f"third tier (refined, >= {near.pixel_min_inliers} inliers; limits median {near.pixel_max_mismatch}, "
        f"90th percentile {near.pixel_max_spread}): {len(different)} pairs of different radiographs, lowest "
        f"median {min((m.mismatch for m in different), default=float('nan')):.2f}, lowest 90th percentile "
        f"{min((m.spread for m in different), default=float('nan')):.2f}; {len(copies)} copies confirmed refined"
    )


def _score_groups(loaded: dict[str, tuple[pd.DataFrame, Duplicates]], review: pd.DataFrame) -> None:
    """What the splitter sees: are both files of a pair in one near-duplicate group of their dataset?

    A copy missed pair by pair is still kept on one side of a split when other copies join the two.
    """
    within = review[review["dataset_a"] == review["dataset_b"]]
    same = pd.Series(False, index=within.index)
    for name in set(within["dataset_a"]):
        table, dups = loaded[name]
        group = dict(zip(table["path"], dups.files["near_group"], strict=True))
        rows = within["dataset_a"] == name
        pairs = zip(within.loc[rows, "path_a"], within.loc[rows, "path_b"], strict=True)
        same[rows] = [group[a] == group[b] for a, b in pairs]
    said = np.where(same, "one group", "two groups")
    print("within-dataset pairs by near-duplicate group (what the splitter keeps together):")
    print(pd.crosstab([within["stratum"], within["eye"]], said).to_string())


def cmd_inspect(args: argparse.Namespace) -> None:
    """Full-resolution views: image a, image b resized onto a, and their amplified difference."""
    from PIL import Image, ImageChops

    review = pd.read_csv(args.review).set_index("pair")
    rows = []
    for pair in args.pairs:
        r = review.loc[pair]
        a, b = (
            Image.fromarray(np.round(read_image(args.shared / d / p, allow_truncated=True) * 255).astype(np.uint8))
            for d, p in ((r["dataset_a"], r["path_a"]), (r["dataset_b"], r["path_b"]))
        )
        b = b.resize(a.size)
        diff = Image.fromarray(np.clip(np.asarray(ImageChops.difference(a, b), float) * 3, 0, 255).astype(np.uint8))
        height = int(300 * a.height / a.width)
        rows.append((pair, [im.resize((300, height)) for im in (a, b, diff)]))
    args.out.mkdir(parents=True, exist_ok=True)
    for page, start in enumerate(range(0, len(rows), 4), 1):
        chunk = rows[start : start + 4]
        height = max(ims[0].height for _, ims in chunk) + 16
        canvas = Image.new("L", (2 * 3 * 304, height * ((len(chunk) + 1) // 2)), 255)
        from PIL import ImageDraw

        draw = ImageDraw.Draw(canvas)
        for k, (pair, ims) in enumerate(chunk):
            x0, y0 = (k % 2) * 3 * 304, (k // 2) * height
            draw.text((x0 + 4, y0 + 2), f"#{pair}: a | b | 3x |a-b|", fill=0)
            for j, im in enumerate(ims):
                canvas.paste(im, (x0 + j * 304, y0 + 14))
        out = args.out / f"inspect_{page:02d}.jpg"
        canvas.save(out, quality=85)
        print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("docs/evidence/review"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="review", help="file stem of the pair list and its montages")
    p.add_argument("--fraction", type=float, default=1.0, help="draw this fraction of the default 200 pairs")
    p.add_argument("--exclude", type=Path, help="a previous review whose pairs are not drawn again")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("inspect")
    p.add_argument("review", type=Path)
    p.add_argument("--pairs", type=int, nargs="+", required=True)
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("docs/evidence"))
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("score")
    p.add_argument("review", type=Path)
    p.add_argument("--groups", action="store_true", help="also check the groups of the full search (minutes)")
    p.add_argument("--shared", type=Path, default=Path("../shared/data"))
    p.set_defaults(func=cmd_score)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
