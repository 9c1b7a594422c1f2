"""How much memory can a small DICOM file claim before fracdet refuses it?

    python benchmarks/dicom_bombs.py [--cap-gb 3] [--out benchmarks/results-dicom-bombs.json]

DICOM has two ways for a few kilobytes to ask for gigabytes, which the pixel limit checked on the header
(Rows x Columns) does not see: a *deflated* dataset (PS3.5 A.5), which pydicom inflates whole when it reads
the file, and a compressed frame whose own JPEG, JPEG-LS or JPEG 2000 header declares a larger image than
the DICOM header does, which the codecs allocate before they find out. Each case below is decoded by
:func:`fracdet.data.decode.decode_image` (the path of the web app, ``fracdet predict`` and the PACS node's
workers) in a process of its own, under an address-space cap (``RLIMIT_AS``, so that a case that would take
the machine's memory fails inside its process instead), and reported: the file's size, what happened
(refused and why, read, or the process killed and by which signal) and the process's peak resident memory.
Controls of the same kinds that must be read are included. Run it on a checkout of another commit to
compare (the cases are built here, with this checkout's test helpers).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._decode_case import decode_case  # noqa: E402
from tests.dicom_files import _compressed, deflated, many_elements, write_bytes  # noqa: E402


def _grey() -> np.ndarray:
    g = np.zeros((64, 64), np.uint8)
    g[::3] = 200
    g[:, ::5] = 90
    return g


def deflated_with_padding(padding: int) -> bytes:
    """A deflated 64x64 radiograph followed by ``padding`` zero bytes of Data Set Trailing Padding (FFFC,FFFC),
    deflated as a stream, so that building a gigabytes-inflating file needs no gigabytes here."""
    from pydicom import dcmwrite
    from pydicom.filewriter import write_file_meta_info

    ds = deflated(_grey())
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    del ds.file_meta
    body = io.BytesIO()
    dcmwrite(body, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(deflater.compress(body.getvalue() + b"\xfc\xff\xfc\xffOB\x00\x00" + padding.to_bytes(4, "little")))
    chunk = bytes(1 << 20)
    for _ in range(padding >> 20):
        out.write(deflater.compress(chunk))
    out.write(deflater.compress(bytes(padding & ((1 << 20) - 1))))
    out.write(deflater.flush())
    return out.getvalue()


def frame_declaring(syntax_name: str, size: int) -> bytes:
    """A 64x64 radiograph compressed, then its codestream's header rewritten to declare ``size`` x ``size``."""
    from pydicom.encaps import encapsulate, get_frame

    ds = _compressed(syntax_name)(_grey())
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    if syntax_name == "JPEGLSLossless":  # SOF55: P, Y, X after the marker and its length
        at = frame.index(b"\xff\xf7")
        frame[at + 5 : at + 9] = size.to_bytes(2, "big") * 2
    else:  # SIZ: Xsiz, Ysiz at 8, 12; one tile of the whole image (XTsiz, YTsiz at 24, 28)
        frame[8:16] = size.to_bytes(4, "big") * 2
        frame[24:32] = size.to_bytes(4, "big") * 2
    ds.PixelData = encapsulate([bytes(frame)])
    return write_bytes(ds)


CASES: dict[str, Callable[[], bytes]] = {
    "deflated, 64x64 (control)": lambda: write_bytes(deflated(_grey())),
    "deflated, 64x64 and 2 GiB of trailing padding": lambda: deflated_with_padding(2 << 30),
    "JPEG-LS 64x64 (control)": lambda: write_bytes(_compressed("JPEGLSLossless")(_grey())),
    "JPEG-LS frame declaring 60000x60000 in a 64x64 header": lambda: frame_declaring("JPEGLSLossless", 60000),
    "JPEG 2000 64x64 (control)": lambda: write_bytes(_compressed("JPEG2000Lossless")(_grey())),
    "JPEG 2000 frame declaring 20000x20000 in a 64x64 header": lambda: frame_declaring("JPEG2000Lossless", 20000),
    "JPEG 2000 frame declaring 60000x60000 in a 64x64 header": lambda: frame_declaring("JPEG2000Lossless", 60000),
    "2.6 million empty private elements ahead of a 64x64 image": lambda: many_elements(_grey(), 2_600_000),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-gb", type=float, default=3.0, help="address-space cap of each decoding process")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    cap = int(args.cap_gb * 2**30)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                            check=False).stdout.strip()  # fmt: skip
    rows = []
    print("| case | file | outcome | peak RSS | seconds |\n|---|---|---|---|---|")
    for name, build in CASES.items():
        data = build()
        row = {"case": name, "file_bytes": len(data), **decode_case(data, cap, timeout=600)}
        rows.append(row)
        peak = f"{row['peak_rss_mb']} MB" if "peak_rss_mb" in row else "-"
        print(f"| {name} | {len(data):,} B | {row['outcome']} | {peak} | {row.get('seconds', '-')} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"commit": commit, "cap_bytes": cap, "cases": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
