"""How long can a small, valid image file keep the decoder busy with structure rather than pixels?

    python benchmarks/structure_floods.py [--megabytes 50] [--baseline REV] [--real DIR ...] [--cases TEXT]
                                          [--out FILE]

Pillow walks the segments of JPEG, PNG and GIF files, and the tiles of TIFF files, in Python, one at a
time, libjpeg decodes each scan of a progressive JPEG over the whole image, and OpenJPEG sets up each tile
of JPEG 2000, so a file of millions of empty segments, or of a thousand tiny scans, is read slowly however
few pixels it has. Each case (built with
``tests/structure_files.py``) is decoded by :func:`fracdet.data.decode.decode_image`, the path of the web
app, ``fracdet predict`` and the PACS node, in a process of its own under an address-space cap, with this
tree's code and, with ``--baseline``, side by side with a checkout of another revision. Controls at the
limits of :mod:`fracdet.data.containers` must be read by both.

``--real`` walks every image file under the folders given and reports the largest count of each kind,
which is what the limits must stay far above (none may be refused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from benchmarks._checkout import checkout, revisions  # noqa: E402
from benchmarks._decode_case import decode_case  # noqa: E402
from tests import structure_files as flood  # noqa: E402


def cases(megabytes: float) -> dict[str, Callable[[], bytes]]:
    """Floods of about ``megabytes`` each, the scan floods at 4000 x 4000 and 100 M pixels, and controls at the
    limits."""
    size = int(megabytes * 1e6)
    return {
        "JPEG, 1,000 segments before its scan (control)": lambda: flood.jpeg_with_segments(1_000),
        f"JPEG, empty comments ({megabytes:g} MB)": lambda: flood.jpeg_with_segments(size // 4),
        f"JPEG, fill bytes before its first marker ({megabytes:g} MB)": lambda: flood.jpeg_with_stray_bytes(size),
        "progressive JPEG 4000x4000, 100 scans (control)": lambda: flood.progressive_jpeg_with_scans(100, 4000),
        "progressive JPEG 4000x4000, 1,000 scans": lambda: flood.progressive_jpeg_with_scans(1_000, 4000),
        "progressive JPEG 5000x4000, 100 scans (control: 2 G pixels over its scans)": lambda: (
            flood.progressive_jpeg_with_scans(100, 5000, 4000)),
        "progressive JPEG 10000x10000, 100 scans": lambda: flood.progressive_jpeg_with_scans(100, 10_000),
        "PNG, 1,000 chunks (control)": lambda: flood.png_with_chunks(1_000),
        f"PNG, empty chunks before its image data ({megabytes:g} MB)": lambda: flood.png_with_chunks(size // 12),
        f"PNG, empty chunks after its image data ({megabytes:g} MB)": lambda: flood.png_with_chunks(size // 12,
                                                                                            after_data=True),
        "PNG, 100,000 IDAT chunks (control)": lambda: flood.png_with_data_chunks(100_000),
        f"PNG, IDAT chunks of a few bytes ({megabytes:g} MB)": lambda: flood.png_with_data_chunks(size // 14),
        "GIF, 10,000 extension blocks (control)": lambda: flood.gif_with_blocks(10_000),
        f"GIF, one-byte comment blocks ({megabytes:g} MB)": lambda: flood.gif_with_blocks(size // 2),
        "TIFF, 100,000 tiles of 16x16 (control)": lambda: flood.tiff_with_tiles(100_000),
        "TIFF, 390,000 tiles of 16x16 (100 M pixels)": lambda: flood.tiff_with_tiles(390_000),
        f"TIFF, tiles of 2x2 ({megabytes:g} MB)": lambda: flood.tiff_with_tiles(size // 8, side=2),
        "DICOM, JPEG 2000 1020x1020 in one tile (control)": lambda: flood.in_dicom(flood.j2k_tiled(1020, 1020, 1020)),
        "DICOM, JPEG 2000 1024x1024 in 4,096 tiles of 16x16 (control)": lambda: flood.in_dicom(
            flood.j2k_tiled(1024, 1024, 16)),
        "DICOM, JPEG 2000 1020x1020 in 65,025 tiles of 4x4": lambda: flood.in_dicom(flood.j2k_tiled(1020, 1020, 4)),
    }  # fmt: skip


def real_counts(folders: list[Path]) -> dict:
    """The largest count of each kind over every image file under ``folders``, and the files refused."""
    from fracdet.data.containers import LIMITS, StructureLimits, walk_structure
    from fracdet.data.decode import is_image_file

    unlimited = StructureLimits(*(None,) * len(LIMITS.__dataclass_fields__))
    largest: dict[str, list] = {}
    files, refused = 0, []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if is_image_file(p)):
            structure = walk_structure(path.read_bytes(), unlimited)
            files += 1
            if structure is None:
                continue
            if structure.excess(LIMITS):
                refused.append(str(path))
            for name, count in structure.counts.items():
                if count > largest.get(name, [-1])[0]:
                    largest[name] = [count, str(path.relative_to(folder.parent))]
    return {"folders": [str(f) for f in folders], "files": files, "largest": largest, "refused": refused}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=50.0, help="size of each flood (the upload limit: 50)")
    parser.add_argument("--baseline", help="also decode each case with this revision's code, side by side")
    parser.add_argument("--real", type=Path, nargs="*", default=[], help="folders of real images to count")
    parser.add_argument("--cap-gb", type=float, default=3.0, help="address-space cap of each decoding process")
    parser.add_argument("--cases", default="", help="only the cases whose name holds this text")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cap = int(args.cap_gb * 2**30)
    result: dict = {"cap_bytes": cap, "megabytes": args.megabytes}
    if args.real:
        result["real"] = real_counts(args.real)
        print(json.dumps(result["real"]["largest"]), f"{len(result['real']['refused'])} refused", flush=True)
    sides = {"now": REPO / "src"}
    with checkout(args.baseline) if args.baseline else contextlib.nullcontext() as baseline_src:
        if args.baseline:
            result["baseline"], result["now"] = revisions(args.baseline)
            sides["baseline"] = baseline_src
        print("| case | file | " + " | ".join(f"{s}: outcome | {s}: s | {s}: peak" for s in sides) + " |")
        rows = []
        for name, build in ((n, b) for n, b in cases(args.megabytes).items() if args.cases in n):
            data = build()
            row = {"case": name, "file_bytes": len(data), **{side: decode_case(data, cap, src=src)
                                                               for side, src in sides.items()}}  # fmt: skip
            rows.append(row)
            cells = " | ".join(f"{row[s]['outcome']} | {row[s].get('seconds', '-')} | "
                               f"{row[s].get('peak_rss_mb', '-')} MB" for s in sides)  # fmt: skip
            print(f"| {name} | {len(data):,} B | {cells} |", flush=True)
    result["cases"] = rows
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
