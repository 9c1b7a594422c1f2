"""Does ``fracdet pacs listen`` keep its memory over many images, as ``fracdet serve`` does?

    python benchmarks/node_memory.py [--images 1000] [--model fracatlas-default]
        [--out benchmarks/results-node-memory.json]

Starts the node as a real process, its results going to DCMTK's ``storescp`` (the PACS), and stores
``--images`` DX radiographs into it (the repository's sample, a new study and SOP Instance UID each) from a
pynetdicom SCU, one association per image as modalities do; a store refused while the queue is full (*Out of
Resources*) is sent again a second later. Every 50 images, once their results have arrived, it samples the
node's resident memory. Issue 16's target for the web server, under 20 MiB of growth per 1,000 predictions
after warm-up, is the yardstick: the node analyses with heatmaps and builds three DICOM objects per image.
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
from _dicom import DX, dx
from _serve import free_port, require

REPO = Path(__file__).resolve().parents[1]
WARM_UP = 50


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def main() -> None:
    from PIL import Image
    from pynetdicom import AE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-node-memory.json")
    args = parser.parse_args()
    if args.images <= WARM_UP:
        parser.error(f"--images must be more than the {WARM_UP} of the warm-up")
    require("storescp", package="dcmtk")
    radiographs = sorted((REPO / "samples/fracatlas/images").rglob("*.jpg"))[:10]
    pixels = [np.asarray(Image.open(path).convert("L")) for path in radiographs]
    port, pacs_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="fracdet-node-memory-") as tmp:
        folder = Path(tmp)
        received = folder / "pacs"
        received.mkdir()
        pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        argv = [sys.executable, "-m", "fracdet", "pacs", "listen", "--allow", "MODALITY", "--port", str(port),
                "--spool", str(folder / "spool"), "--send-to", f"PACS@127.0.0.1:{pacs_port}",
                "--model", args.model]  # fmt: skip
        log_path = folder / "node.log"
        with log_path.open("w") as log:
            env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FRACDET_PHI_KEY": "bench"}
            node = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while "listening on" not in log_path.read_text():
                    if node.poll() is not None:
                        raise SystemExit("the node did not start:\n" + log_path.read_text()[-2000:])
                    time.sleep(0.2)
                ae = AE(ae_title="MODALITY")
                ae.add_requested_context(DX)
                samples, refused, start = [], 0, time.monotonic()
                for k in range(args.images):
                    while True:
                        assoc = ae.associate("127.0.0.1", port, ae_title="FRACDET")
                        status = int(assoc.send_c_store(dx(pixels[k % len(pixels)])).Status)
                        assoc.release()
                        if status == 0:
                            break
                        refused += 1
                        time.sleep(1)
                    if (k + 1) % 50 == 0:
                        while len(list(received.iterdir())) < 3 * (k + 1):  # its results are in the PACS
                            time.sleep(0.2)
                        samples.append({"images": k + 1, "rss_mb": round(_rss_mb(node.pid), 1),
                                        "s": round(time.monotonic() - start, 1)})  # fmt: skip
                        print(samples[-1], flush=True)
            finally:
                node.terminate()
                node.wait(60)
                pacs.terminate()
                pacs.wait(30)
    after_warm_up = next(s["rss_mb"] for s in samples if s["images"] >= WARM_UP)
    report = {
        "command": " ".join(["python", "benchmarks/node_memory.py", *sys.argv[1:]]),
        "images": args.images,
        "stores_refused_then_resent": refused,
        "rss_mb_after_warm_up": after_warm_up,
        "rss_mb_end": samples[-1]["rss_mb"],
        "growth_mb_per_1000": round((samples[-1]["rss_mb"] - after_warm_up) * 1000 / max(1, args.images - WARM_UP), 1),
        "samples": samples,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
