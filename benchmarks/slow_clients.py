"""What can clients that send slowly make ``fracdet serve`` hold, and does it still answer its health check?

    python benchmarks/slow_clients.py [--baseline REV] [--clients 1100] [--seconds 40] [--nofile 1024]
        [--model fracatlas-default] [--out benchmarks/results-slow-clients.json]

Starts ``fracdet serve`` of this tree (and, with ``--baseline``, of an earlier commit checked out beside it)
as its own process, with the soft limit on open files a systemd service starts with (``--nofile``, 1,024;
the hard limit stays this machine's), and tries three kinds of slow client on it, ``--clients`` at once for
``--seconds``, one after the other:

* ``headers``: each sends a request line, then a header line every 3 s, never the blank line that ends them
  (slowloris);
* ``body``: each sends whole headers announcing a 100 kB upload, then one byte of it every 3 s;
* ``silent``: each opens a connection and sends nothing.

Throughout, another client asks ``/api/v1/health`` every half second (5 s timeout). Reported for each kind:
connections the server closed and when (median and last, seconds after the client opened it), health
checks answered and their p95, the lines the server logged, and the server's resident memory at its peak;
afterwards a radiograph is uploaded and must be analysed (the server survived).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkout import checkout, revisions  # noqa: E402
from _serve import free_port, wait_healthy  # noqa: E402

SAMPLE = REPO / "samples" / "fracatlas" / "images" / "Fractured" / "IMG0000261.jpg"
GAP_S = 3.0
OPENINGS = {
    "headers": b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n",
    "body": b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n",
    "silent": b"",
}
TRICKLE = {"headers": b"X-Slow: 1\r\n", "body": b"a", "silent": b""}


async def _client(kind: str, port: int, seconds: float, closed_after: list[float]) -> None:
    """One slow client: what it sends, until the server closes its connection or ``seconds`` pass."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    opened = time.monotonic()
    try:
        writer.write(OPENINGS[kind])
        while (left := opened + seconds - time.monotonic()) > 0:
            try:  # the server's answer (a 408) or its closing ends the wait at once
                while await asyncio.wait_for(reader.read(65536), min(GAP_S, left)):
                    pass
                closed_after.append(time.monotonic() - opened)
                return
            except TimeoutError:
                writer.write(TRICKLE[kind])
                await writer.drain()
    except OSError:
        closed_after.append(time.monotonic() - opened)
    finally:
        writer.close()


def _watch_health(port: int, stop: threading.Event, answers: list[float | None]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ok = requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5).ok
            answers.append(1000 * (time.perf_counter() - started) if ok else None)
        except requests.RequestException:
            answers.append(None)
        stop.wait(0.5)


def _rss_peak_mb(pid: int) -> float:
    with Path(f"/proc/{pid}/status").open() as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def _reset_peak(pid: int) -> None:
    with Path(f"/proc/{pid}/clear_refs").open("w") as refs:  # resets VmHWM to the current RSS
        refs.write("5")


def attack(kind: str, port: int, pid: int, clients: int, seconds: float, log: Path) -> dict:
    lines_before = len(log.read_bytes().splitlines())
    _reset_peak(pid)
    answers: list[float | None] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_health, args=(port, stop, answers))
    watcher.start()
    closed_after: list[float] = []

    async def everyone() -> None:
        await asyncio.gather(*(_client(kind, port, seconds, closed_after) for _ in range(clients)))

    asyncio.run(everyone())
    stop.set()
    watcher.join()
    answered = sorted(a for a in answers if a is not None)
    return {
        "closed_by_server": len(closed_after),
        "closed_after_s_median": round(statistics.median(closed_after), 1) if closed_after else None,
        "closed_after_s_last": round(max(closed_after), 1) if closed_after else None,
        "health_answered": f"{len(answered)}/{len(answers)}",
        "health_p95_ms": round(answered[int(0.95 * (len(answered) - 1))], 1) if answered else None,
        "log_lines": len(log.read_bytes().splitlines()) - lines_before,
        "peak_rss_mb": round(_rss_peak_mb(pid)),
    }


def run(src: Path, model: str, clients: int, seconds: float, nofile: int, folder: Path) -> dict:
    port = free_port()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    log = folder / f"serve-{port}.log"
    command = ["prlimit", f"--nofile={nofile}:{hard}", sys.executable, "-m", "fracdet", "serve", "--model", model,
               "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(src)}, stdout=out, stderr=out)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server)
        limits = Path(f"/proc/{server.pid}/limits").read_text().splitlines()
        soft = next(line.split()[3] for line in limits if line.startswith("Max open files"))
        results: dict = {"open_file_limit_while_serving": int(soft)}
        for kind in OPENINGS:
            results[kind] = attack(kind, port, server.pid, clients, seconds, log)
            print(f"  {kind:8s} {results[kind]}", flush=True)
        data = SAMPLE.read_bytes()
        answer = requests.post(f"http://127.0.0.1:{port}/api/v1/predict", timeout=60,
                               files={"file": (SAMPLE.name, data, "image/jpeg")})  # fmt: skip
        results["afterwards"] = {"status": answer.status_code, "probability": answer.json().get("probability")}
        print(f"  afterwards {results['afterwards']}", flush=True)
        return results
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="an earlier commit to run side by side")
    parser.add_argument("--clients", type=int, default=1100)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--nofile", type=int, default=1024, help="the server's soft limit on open files")
    parser.add_argument("--model", default="fracatlas-default")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results-slow-clients.json"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.clients + 100:  # the clients' own sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.clients + 1000), hard))
    report = {"clients": args.clients, "seconds": args.seconds, "gap_s": GAP_S, "nofile": args.nofile,
              "hard_nofile": hard, "model": args.model, "command": " ".join(sys.argv), "trees": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            base, here = revisions(args.baseline)
            with checkout(args.baseline) as src:
                print(f"baseline {base}", flush=True)
                report["trees"][f"baseline {base}"] = run(src, args.model, args.clients, args.seconds, args.nofile,
                                                          Path(folder))  # fmt: skip
        else:
            here = revisions("HEAD")[1]
        print(f"this tree {here}", flush=True)
        report["trees"][f"this tree {here}"] = run(REPO / "src", args.model, args.clients, args.seconds,
                                                   args.nofile, Path(folder))  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
