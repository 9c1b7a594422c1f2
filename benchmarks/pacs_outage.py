"""Are results delivered when the PACS they go to was away while the images came?

    python benchmarks/pacs_outage.py [--baseline REV] [--images 5] [--outage-s 60] [--model fracatlas-default]
        [--out benchmarks/results-pacs-outage.json]

Starts ``fracdet pacs listen`` of this tree (and, with ``--baseline``, of an earlier commit, checked out
beside it) as a real process whose destination is a port where nothing listens yet: the PACS is away (a
restart, a patch, the network). ``--images`` radiographs of the repository's sample, made DX, are stored into
the node by DCMTK's ``storescu`` while it is away; after ``--outage-s`` the PACS comes back (DCMTK's
``storescp`` on that port) and the benchmark waits up to two minutes for the result objects (three per
image). It reports the objects the PACS received, how long after its return the last one came, what the
node quarantined, and the lines it logged about delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkout import side_by_side  # noqa: E402
from _dicom import dx  # noqa: E402
from _serve import free_port, require  # noqa: E402


def _radiographs(folder: Path, count: int) -> list[Path]:
    """The sample's fractured radiographs as DX files (8-bit MONOCHROME2, one study, one series)."""
    from PIL import Image
    from pydicom.uid import generate_uid

    sources = sorted((REPO / "samples/fracatlas/images/Fractured").glob("*.jpg"))[:count]
    study, series = generate_uid(), generate_uid()
    paths = []
    for k, source in enumerate(sources):
        pixels = np.asarray(Image.open(source).convert("L"))
        path = folder / f"{k}.dcm"
        dx(pixels, study=study, series=series, InstanceNumber=k + 1).save_as(path, enforce_file_format=True)
        paths.append(path)
    if len(paths) < count:
        raise SystemExit(f"the sample has {len(paths)} fractured radiographs, fewer than --images {count}")
    return paths


def _store(port: int, path: Path) -> bool:
    run = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "FRACDET", "127.0.0.1", str(port), str(path)],
                         capture_output=True, timeout=120, check=False)  # fmt: skip
    return run.returncode == 0


def run_node(src: Path, model: str, folder: Path, images: list[Path], outage_s: float) -> dict:
    """Start the node whose package is under ``src`` with its PACS away, store, bring the PACS back, count."""
    port, pacs_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "FRACDET_PHI_KEY": "benchmark"}
    argv = [sys.executable, "-m", "fracdet", "pacs", "listen", "--allow", "MODALITY", "--port", str(port),
            "--spool", str(folder / "spool"), "--send-to", f"PACS@127.0.0.1:{pacs_port}", "--model", model]  # fmt: skip
    log_path = folder / "node.log"
    received = folder / "pacs"
    received.mkdir()
    with log_path.open("w") as log:
        node = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        pacs = None
        try:
            for _ in range(600):
                if "listening on" in log_path.read_text() or node.poll() is not None:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError("the node did not start")
            away = time.monotonic()
            stored = sum(_store(port, path) for path in images)
            time.sleep(max(0.0, outage_s - (time.monotonic() - away)))
            pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            back = time.monotonic()
            expected, last = 3 * len(images), None
            while time.monotonic() - back < 120:
                count = len(list(received.iterdir()))
                if count >= expected:
                    last = time.monotonic() - back
                    break
                time.sleep(0.5)
            spool = folder / "spool"
            lines = log_path.read_text().splitlines()
            return {
                "images_stored": stored,
                "objects_received": len(list(received.iterdir())),
                "objects_expected": expected,
                "all_received_after_back_s": None if last is None else round(last, 1),
                "radiographs_quarantined": len(list((spool / "quarantine").glob("*.dcm"))),
                "results_waiting": len([p for p in spool.glob("outbox/*") if p.is_dir()]),
                "delivery_lines_logged": sum("not delivered" in line for line in lines),
            }
        finally:
            node.terminate()
            node.wait(60)
            if pacs is not None:
                pacs.terminate()
                pacs.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="also run the node of this earlier commit")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-pacs-outage.json")
    args = parser.parse_args()
    require("storescu", "storescp", package="dcmtk")
    with tempfile.TemporaryDirectory(prefix="fracdet-outage-") as tmp:
        folder = Path(tmp)
        (folder / "images").mkdir()
        images = _radiographs(folder / "images", args.images)
        report = {"command": " ".join(["python", "benchmarks/pacs_outage.py", *sys.argv[1:]])}
        report |= side_by_side(args.baseline, folder,
                               lambda src, out: run_node(src, args.model, out, images, args.outage_s))  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
