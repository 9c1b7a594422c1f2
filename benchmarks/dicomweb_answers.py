"""What can a DICOMweb server's answer make ``fracdet pacs pull`` hold, and for how long?

    python benchmarks/dicomweb_answers.py [--baseline REV] [--gib 1] [--search-mb 280] [--model fracatlas-default]
        [--answers NAME,...] [--out benchmarks/results-dicomweb-answers.json]

Serves one study of one DX instance from a local DICOMweb server (QIDO-RS, WADO-RS, STOW-RS) and runs
``fracdet pacs pull --study`` of this tree (and, with ``--baseline``, of an earlier commit checked out beside
it) against it, once for each answer the server gives for the instance:

* ``radiograph``: the control, a FracAtlas sample radiograph as a DX, which must be analysed;
* ``deflated``: a deflated dataset (PS3.5 A.5) of about 1 MB that inflates to ``--gib`` GiB, as any modality
  could store in the PACS;
* ``endless``: a ``multipart/related`` answer of ``--gib`` GiB, sent as fast as it is read;
* ``drip``: an answer that sends a byte every half second and never ends;
* ``headers-drip``: an answer whose headers never end, a byte every half second;

and then for the series search (QIDO-RS), which comes before any instance:

* ``search-endless``: a JSON answer of ``--search-mb`` MB, sent as fast as it is read;
* ``search-drip``: a JSON answer that sends a byte every half second and never ends;
* ``search-headers-drip``: headers that never end, a byte every half second;
* ``search-busy``: HTTP 503 (*Service Unavailable*), every time it is asked.

``--answers`` runs some of them only. Each pull is stopped after 240 s.

Each pull runs as its own process; the table reports its peak resident memory (``wait4``'s ``ru_maxrss``),
its time, its row's error and how many times the server was asked for that answer. Run it with memory to
spare: the baseline's ``deflated`` and ``endless`` each held about 5 GB at ``--gib 1``, and its
``search-endless`` as much at ``--search-mb 280``.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkout import checkout, revisions  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.dicomweb_server import MULTIPART, SERIES, Answer, dripped_headers, file, multipart, raw, serving  # noqa: E402

STUDY = "1.2.826.0.1.3680043.8.498.75"
DRIP_LIMIT_S = 240
ANSWERS = ("radiograph", "deflated", "endless", "drip", "headers-drip", "search-endless", "search-drip",
           "search-headers-drip", "search-busy")  # fmt: skip


def _dx(pixels: np.ndarray, **extra) -> tuple[bytes, bytes]:
    """A DX of 8-bit ``pixels``: (file meta with preamble, the dataset in explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = extra.pop("syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    for tag, (vr, value) in extra.items():
        ds.add_new(int(tag, 16), vr, value)
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def radiograph() -> bytes:
    from PIL import Image

    pixels = np.asarray(Image.open(REPO / "samples/fracatlas/images/Fractured/IMG0000261.jpg").convert("L"))
    return b"".join(_dx(pixels))


def deflated(inflated: int) -> bytes:
    """A deflated DX with ``inflated`` bytes of zeros in a private element, deflated as it is made (never
    held whole): about a thousandth of what it inflates to."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    mark = b"fracdet-deflated-mark"[:20]
    head, body = _dx(np.zeros((64, 64), np.uint8), syntax=DeflatedExplicitVRLittleEndian,
                     **{"00091010": ("OB", mark)})  # fmt: skip
    at = body.index(mark)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as PS3.5 A.5 has it
    out = [packer.compress(body[: at - 4] + struct.pack("<I", inflated))]
    zeros = bytes(1 << 20)
    out += [packer.compress(zeros) for _ in range(inflated >> 20)]
    out += [packer.compress(body[at + len(mark) :]), packer.flush()]
    data = b"".join(out)
    return head + data + (b"\0" if len(data) % 2 else b"")


def _pull(src: Path, url: str, model: str, out: Path) -> dict:
    """One ``fracdet pacs pull`` of the tree at ``src``: its peak memory, time and row."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "fracdet", "pacs", "pull", "--dicomweb", url, "--study", STUDY,
               "--model", model, "--out", str(out)]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stopped = threading.Timer(DRIP_LIMIT_S, child.kill)
    stopped.start()
    _, status, usage = os.wait4(child.pid, 0)
    stopped.cancel()
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    row = json.loads(out.read_text())[0] if out.exists() else None
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024), "seconds": round(seconds, 1),
            "exit": child.returncode, "killed_after_s": DRIP_LIMIT_S if child.returncode == -9 else None,
            "error": row and row["error"], "probability": row and row["probability"]}  # fmt: skip


def run(src: Path, url: str, state: dict, model: str, folder: Path, answers: list[str]) -> dict:
    results = {}
    for answer in answers:
        state["answer"], state["asked"] = answer, 0
        out = folder / f"{answer}.json"
        out.unlink(missing_ok=True)
        results[answer] = {**_pull(src, url, model, out), "asked": state["asked"]}
        print(f"  {answer:10s} {results[answer]}", flush=True)
    return results


def _answers(gib: int, search_mb: int) -> tuple[dict, Callable[[str], Answer], Callable[[str], Answer | None]]:
    """The server's state (which answer it gives now), what it sends for the instance and for a search."""
    files = {"radiograph": radiograph(), "deflated": deflated(gib << 30)}
    state = {"answer": "radiograph", "asked": 0, "deflated_file_bytes": len(files["deflated"])}

    def answer(_: str) -> Answer:
        if not state["answer"].startswith("search-"):
            state["asked"] += 1
        if state["answer"] == "headers-drip":
            return dripped_headers(0.5)
        if state["answer"] == "endless":
            block = bytes(1 << 20)
            return MULTIPART, multipart(*(block for _ in range(gib << 10))), 0.0
        if state["answer"] == "drip":
            return MULTIPART, (b"-" for _ in range(10 * DRIP_LIMIT_S)), 0.5
        return file(files[state["answer"]])

    def search(level: str) -> Answer | None:
        if level != "series" or not state["answer"].startswith("search-"):
            return None
        state["asked"] += 1
        if state["answer"] == "search-headers-drip":
            return dripped_headers(0.5)
        if state["answer"] == "search-busy":
            return raw("503 Service Unavailable")
        if state["answer"] == "search-drip":
            return "application/dicom+json", (b"[" if i == 0 else b" " for i in range(10 * DRIP_LIMIT_S)), 0.5
        item = b'{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, "00080060": {"vr": "CS", "Value": ["DX"]}}, '
        block = item * ((1 << 20) // len(item))
        return "application/dicom+json", [b"[", *(block for _ in range(search_mb)), item[:-2], b"]"], 0.0

    return state, answer, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an earlier commit to run side by side")
    parser.add_argument("--gib", type=int, default=1, help="what the deflated and endless answers amount to")
    parser.add_argument("--search-mb", type=int, default=280, help="what the endless search answer amounts to")
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--answers", default=",".join(ANSWERS), help=f"some of {','.join(ANSWERS)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-dicomweb-answers.json"))
    args = parser.parse_args()
    answers = args.answers.split(",")
    if unknown := set(answers) - set(ANSWERS):
        parser.error(f"no such answer: {', '.join(sorted(unknown))}")
    state, answer, search = _answers(args.gib, args.search_mb)
    report = {"gib": args.gib, "search_mb": args.search_mb, "deflated_file_bytes": state["deflated_file_bytes"],
              "model": args.model, "command": " ".join(sys.argv), "trees": {}}  # fmt: skip
    with serving([f"{SERIES}.1"], answer, search=search) as url, tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            base, here = revisions(args.baseline)
            with checkout(args.baseline) as src:
                print(f"baseline {base}", flush=True)
                report["trees"][f"baseline {base}"] = run(src, url, state, args.model, Path(folder), answers)
        else:
            here = revisions("HEAD")[1]
        print(f"this tree {here}", flush=True)
        report["trees"][f"this tree {here}"] = run(REPO / "src", url, state, args.model, Path(folder), answers)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
