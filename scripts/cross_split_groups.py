"""Pictures of the groups a split manifest puts on both sides: each group's held-out file beside a file of
another split, with split, label and name, for a person to judge (a second exposure of one limb, or two
patients the audit joined).

    python scripts/cross_split_groups.py ../shared/data/fracatlas --splits splits/fracatlas_seed0.csv \
        --out docs/evidence/fracatlas_cross_split_groups.png

The groups are the audit's (`fracdet audit DATASET --splits MANIFEST` counts the same files).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from fracdet.data import load_dataset
from fracdet.data.duplicates import find_duplicates
from fracdet.data.split import apply_manifest

TILE = 200


def tile(root: Path, row) -> Image.Image:
    image = Image.open(root / row["path"]).convert("L")
    image.thumbnail((TILE, TILE))
    canvas = Image.new("L", (TILE, TILE + 15), 255)
    canvas.paste(image, (0, 0))
    ImageDraw.Draw(canvas).text((2, TILE + 2), f"{row['split']} label {row['label']} {Path(row['path']).stem}", fill=0)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--splits", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    table = apply_manifest(load_dataset(args.data), args.splits)
    table = table.assign(group=find_duplicates(table).files["near_group"].to_numpy())
    crossing = table.groupby("group")["split"].nunique()
    groups = table[table["group"].isin(crossing[crossing > 1].index)]
    pairs = []
    for _, members in groups.groupby("group"):
        held_out = members[members["split"] != "train"].iloc[0]
        other = members[members["path"] != held_out["path"]].iloc[0]
        pairs.append((tile(args.data, held_out), tile(args.data, other)))
    columns = 4
    sheet = Image.new("L", (columns * (2 * TILE + 10), -(-len(pairs) // columns) * (TILE + 20)), 255)
    for k, (a, b) in enumerate(pairs):
        x, y = (k % columns) * (2 * TILE + 10), (k // columns) * (TILE + 20)
        sheet.paste(a, (x, y))
        sheet.paste(b, (x + TILE, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{len(pairs)} groups cross the split ({len(groups)} files); picture: {args.out}")


if __name__ == "__main__":
    main()
