"""What can a DICOM peer make ``fracdet pacs listen`` hold, and for how long?

    python benchmarks/dicom_peers.py [--baseline REV] [--model fracatlas-default]
        [--out benchmarks/results-dicom-peers.json]

Starts the node of this tree (and, with ``--baseline``, the node of an earlier commit, checked out beside
it) as a real process on a free local port, and tries it as a peer on the hospital network could:

* ``pdu-4gib``: a connection that announces an association request of 4 GiB and streams 1 GiB of it; no
  AE title has been read, so any peer that reaches the port can do this;
* ``stalled-pdu``: a PDU's header and ten bytes of its body, then nothing;
* ``silent``: a connection that sends nothing at all;
* ``silent-slots``: eight connections from another address (127.0.0.2) that send nothing, then three
  echoes from 127.0.0.1 while they wait (the node allows 4 associations): answered or rejected;
* ``store-512mb``: an allowed caller (DCMTK's ``storescu``) storing a 512 MB DX;
* ``store-small``: the control, a 2 MB DX, which must be stored.

Each case reports what happened (the connection closed by the node and after how long, or a store's
status) and the node's resident memory before and at its peak (``VmHWM``, reset between cases through
``/proc/PID/clear_refs``). An echo after all of them says whether the node still serves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkout import side_by_side  # noqa: E402
from _dicom import dx  # noqa: E402
from _serve import free_port, require  # noqa: E402


def _dx(path: Path, side: int) -> Path:
    """A DX of ``side`` x ``side`` 12-bit pixels (noise: its content does not matter here)."""
    pixels = np.random.default_rng(0).integers(0, 4096, (side, side), dtype=np.uint16)
    dx(pixels, bits=12).save_as(path, enforce_file_format=True)
    return path


def _memory(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def _closed_after(port: int, first: bytes, then: int = 0, wait_s: float = 120.0) -> dict:
    """Send ``first``, then ``then`` zero bytes; how long until the node closes the connection (if it does)."""
    start = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as peer:
        peer.settimeout(wait_s)
        try:
            peer.sendall(first)
            chunk = bytes(1 << 20)
            while sent < then:
                peer.sendall(chunk)
                sent += len(chunk)
            closed = peer.recv(16) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        except TimeoutError:
            closed = False
    return {"closed_by_node": closed, "after_s": round(time.monotonic() - start, 1), "sent_mib": sent >> 20}


def _store(port: int, path: Path) -> dict:
    run = subprocess.run(["storescu", "-aet", "PACS", "-aec", "FRACDET", "127.0.0.1", str(port), str(path)],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    return {"storescu_exit": run.returncode, "stored": run.returncode == 0}


def _silent_slots(port: int, connections: int = 8, echoes: int = 3) -> dict:
    """Connections that send nothing, from another address, and echoes from this one while they wait."""
    with contextlib.ExitStack() as opened:
        silent = [opened.enter_context(socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)))
                  for _ in range(connections)]  # fmt: skip
        time.sleep(1)
        closed = 0
        for peer in silent:
            peer.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                closed += peer.recv(1) == b""
        answered = sum(_echo(port) for _ in range(echoes))
    return {"silent_connections": connections, "closed_at_once": closed, "echoes_answered": f"{answered}/{echoes}"}


def _echo(port: int) -> bool:
    run = subprocess.run(["echoscu", "-aet", "PACS", "-aec", "FRACDET", "127.0.0.1", str(port)],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    return run.returncode == 0


def run_node(src: Path, model: str, folder: Path, files: dict[str, Path]) -> dict:
    """Start the node whose package is under ``src``, try every case on it, stop it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "FRACDET_PHI_KEY": "benchmark"}
    argv = [sys.executable, "-m", "fracdet", "pacs", "listen", "--allow", "PACS", "--port", str(port),
            "--spool", str(folder / "spool"), "--send-to", "DEST@127.0.0.1:9", "--model", model]  # fmt: skip
    log = (folder / "node.log").open("w")
    node = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(600):
            if "listening on" in (folder / "node.log").read_text() or node.poll() is not None:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("the node did not start")
        cases = {
            "pdu-4gib": lambda: _closed_after(port, b"\x01\x00" + struct.pack(">L", 2**32 - 16), 1 << 30, 30),
            "store-512mb": lambda: _store(port, files["large"]),
            "store-small": lambda: _store(port, files["small"]),
            "silent-slots": lambda: _silent_slots(port),
        }
        results: dict[str, dict] = {}
        for name, case in cases.items():
            Path(f"/proc/{node.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = _memory(node.pid)
            results[name] = {**case(), "rss_before_mb": round(before["VmRSS"]),
                             "peak_mb": round(_memory(node.pid)["VmHWM"])}  # fmt: skip
        slow: dict[str, dict] = {}  # the two waits side by side: each is the node's timer, not memory
        waits = {"stalled-pdu": b"\x01\x00" + struct.pack(">L", 100) + bytes(10), "silent": b""}
        threads = [threading.Thread(target=lambda n=n, f=f: slow.__setitem__(n, _closed_after(port, f)))
                   for n, f in waits.items()]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.update(slow)
        results["echo_after"] = {"answered": _echo(port)}
        return results
    finally:
        node.terminate()
        node.wait(60)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="also try the node of this earlier commit")
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results-dicom-peers.json")
    args = parser.parse_args()
    require("storescu", "echoscu", package="dcmtk")
    with tempfile.TemporaryDirectory(prefix="fracdet-peers-") as tmp:
        folder = Path(tmp)
        files = {"large": _dx(folder / "large.dcm", 16000), "small": _dx(folder / "small.dcm", 1024)}
        report = {"command": " ".join(["python", "benchmarks/dicom_peers.py", *sys.argv[1:]]),
                  "sizes_mb": {k: round(p.stat().st_size / 1e6, 1) for k, p in files.items()}}  # fmt: skip
        report |= side_by_side(args.baseline, folder, lambda src, out: run_node(src, args.model, out, files))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
