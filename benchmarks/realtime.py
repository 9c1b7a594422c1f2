"""Real time (issue 18): this checkout against "today" (main at 68a96c8, release 0.3.0), side by side in one run.

    python benchmarks/realtime.py --data ../shared/data/fracatlas [--baseline 68a96c8] [--images 200]
        [--rate 30] [--seconds 60] [--closed-seconds 30] [--predict-limit 0] [--parts e2e,server,predict]
        [--serve-args "--threads 1"] [--model fracatlas-default] [--out benchmarks/results-realtime.json]

The baseline is checked out into a temporary git worktree and imported from there (``PYTHONPATH``), with the
same Python packages, on the same machine, in the same run. Three comparisons, each on distinct FracAtlas
radiographs (a seeded shuffle of the dataset; nothing is cached between requests):

* **e2e** (in process): one image from its file's bytes to the JSON response ready (decode, gate, model,
  heatmap, response body), one worker process per checkout, alternating chunks of 10 images so that the
  machine's load falls on both alike. Also compares their probabilities: the fast path must give the
  PyTorch path's answers.
* **server**: ``fracdet serve`` of each checkout in its own process, started afresh for each load: an
  open-loop load of ``--rate`` requests/s for ``--seconds`` (arrivals do not wait for answers), closed loops
  of 32 and 64 clients for ``--closed-seconds`` each; the health endpoint is asked every 100 ms throughout.
* **predict**: ``fracdet predict`` of each checkout over the dataset's images (``--predict-limit``: the
  first N of the shuffle; 0: all), images/s.
* **startup** (not in the default ``--parts``): ``fracdet predict`` of one image, 5 times each, alternating:
  what every command pays before its first image.

In every part both checkouts run ``--model`` where the baseline has that release too (an A/B of code); a
baseline without it (68a96c8 has no ``fracatlas-localiser``) runs its own ``fracatlas-default``. The
default, ``fracatlas-default``, is in both: this checkout's (1.1.0 on) against 68a96c8's (0.3.0).

Writes one JSON with the machine, the commands and every figure; ``docs/BENCHMARKS.md`` quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _checkout import checkout
from _serve import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
SUFFIXES = {".jpg", ".jpeg", ".png"}


# ---------------------------------------------------------------- worker: one checkout, in its own process
def worker() -> None:
    """Answer chunks of image paths on stdin with per-image end-to-end milliseconds and probabilities."""
    import inspect

    from fracdet.inference import Predictor
    from fracdet.models import load
    from fracdet.serve import app as serving

    model = load(os.environ.get("FRACDET_BENCH_MODEL", "fracatlas-default"))
    predictor = Predictor(model)
    takes_image = "image" in inspect.signature(serving._response).parameters  # the API after issue 18

    def respond(path: str) -> tuple[float, float | None]:
        started = time.perf_counter()
        data = Path(path).read_bytes()
        try:
            prediction = predictor.predict_bytes(data, Path(path).name)
        except Exception:  # a refused image: the API's 4xx body is tiny
            return 1000 * (time.perf_counter() - started), None
        latency = 1000 * (time.perf_counter() - started)
        if takes_image:
            body = serving._response(prediction, model, latency, backend=predictor.backend,
                                     image=prediction.source_format not in serving.BROWSER_FORMATS)  # fmt: skip
        else:
            body = serving._response(prediction, model, latency)
        json.dumps(body)
        return 1000 * (time.perf_counter() - started), prediction.probability

    print(json.dumps({"ready": True, "backend": getattr(predictor, "backend", "pytorch")}), flush=True)
    for line in sys.stdin:
        results = [respond(p) for p in json.loads(line)]
        print(json.dumps({"ms": [r[0] for r in results], "probability": [r[1] for r in results]}), flush=True)


#: The model "now" runs (``--model``), and "today" where it has that release (else its own ``fracatlas-default``).
NOW_MODEL = "fracatlas-default"


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ, FRACDET_PROGRESS="0")
    env.pop("FRACDET_BENCH_MODEL", None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    if _same_model_args(src):
        env["FRACDET_BENCH_MODEL"] = NOW_MODEL
    return env


def _same_model_args(src: Path | None) -> list[str]:
    """``--model`` for both checkouts when the baseline has that release too (an A/B of code, not of models);
    a baseline without it runs its own ``fracatlas-default``."""
    root = REPO if src is None else src.parent
    return ["--model", NOW_MODEL] if (root / "models" / NOW_MODEL).is_dir() else []


def e2e(checkouts: dict[str, Path | None], images: list[str], chunk: int = 10) -> dict:
    """Per-image end-to-end latency of each checkout, alternating chunks (see the module docstring)."""
    procs = {name: subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=_env(src), cwd=REPO)
             for name, src in checkouts.items()}  # fmt: skip
    ready = {name: json.loads(p.stdout.readline()) for name, p in procs.items()}
    results: dict[str, dict[str, list]] = {name: {"ms": [], "probability": []} for name in procs}

    def ask(name: str, paths: list[str]) -> dict:
        procs[name].stdin.write(json.dumps(paths) + "\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    for name in procs:  # warm-up on images outside the measured set
        ask(name, images[-5:])
    measured = images[:-5]
    for k in range(0, len(measured), chunk):
        order = list(procs) if (k // chunk) % 2 == 0 else list(reversed(procs))
        for name in order:
            answer = ask(name, measured[k : k + chunk])
            results[name]["ms"] += answer["ms"]
            results[name]["probability"] += answer["probability"]
    for p in procs.values():
        p.stdin.close()
        p.wait()
    out = {name: {"backend": ready[name]["backend"], "images": len(r["ms"]), **_summary(r["ms"])}
           for name, r in results.items()}  # fmt: skip
    a, b = (results[n]["probability"] for n in checkouts)
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    out["max_probability_difference"] = max((abs(x - y) for x, y in both), default=None)
    out["answered_by_both"] = len(both)
    out["ratio_median"] = out["now"]["median_ms"] / out["today"]["median_ms"]
    return out


def _summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": statistics.fmean(ms)}


# ---------------------------------------------------------------- server under load
def _start_server(src: Path | None, extra: Sequence[str] = ()) -> tuple[subprocess.Popen, str]:

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fracdet", "serve", "--port", str(port), *extra], env=_env(src),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout_s=300)
    except RuntimeError:
        proc.kill()
        raise
    return proc, base


async def _load(base: str, files: list[bytes], *, rate: float | None, clients: int | None, seconds: float) -> dict:
    """Open loop (``rate`` arrivals/s) or closed loop (``clients`` posting back to back), health every 100 ms."""
    import httpx

    statuses: dict[str, int] = {}
    latencies: list[float] = []
    health: list[float] = []
    health_failures: list[bool] = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        counter = iter(range(10**9))

        async def post() -> None:
            data = files[next(counter) % len(files)]
            started = time.perf_counter()
            try:
                response = await client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")})
                key = str(response.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                latencies.append(1000 * (time.perf_counter() - started))

        stop = time.perf_counter() + seconds

        async def watch_health() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=10) as probe:
                while time.perf_counter() < stop:
                    started = time.perf_counter()
                    try:
                        ok = (await probe.get("/api/v1/health")).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    health.append(1000 * (time.perf_counter() - started))
                    health_failures.append(not ok)
                    await asyncio.sleep(0.1)

        async def closed_client() -> None:
            while time.perf_counter() < stop:
                await post()

        began = time.perf_counter()
        watcher = asyncio.create_task(watch_health())
        if rate is not None:
            tasks = []
            for k in range(int(rate * seconds)):
                await asyncio.sleep(max(0.0, began + k / rate - time.perf_counter()))
                tasks.append(asyncio.create_task(post()))
            await asyncio.gather(*tasks)
        else:
            await asyncio.gather(*(closed_client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
        await watcher
    ok = statuses.get("200", 0)
    return {"rate": rate, "clients": clients, "seconds": round(elapsed, 1), "statuses": statuses,
            "errors": sum(v for k, v in statuses.items() if not k.startswith(("2", "4"))),  # 5xx and failures
            "refused": sum(v for k, v in statuses.items() if k.startswith("4")),  # e.g. a truncated file: 422
            "throughput_per_s": ok / elapsed,
            "latency": _summary(latencies) if latencies else None,
            "health_p95_ms": float(np.percentile(health, 95)), "health_max_ms": max(health),
            "health_failures": int(sum(health_failures)), "health_checks": len(health)}  # fmt: skip


def server(checkouts: dict[str, Path | None], images: list[str], args: argparse.Namespace) -> dict:
    files = [Path(p).read_bytes() for p in images]
    out: dict[str, dict] = {}
    closed = {f"closed_{n}": {"rate": None, "clients": n, "seconds": args.closed_seconds} for n in (32, 64)}
    phases = {"open_loop": {"rate": args.rate, "clients": None, "seconds": args.seconds}, **closed}
    for name, src in checkouts.items():
        out[name] = {}
        for phase, load in phases.items():  # a fresh server each: no phase inherits another's backlog
            extra = [*_same_model_args(src), *(shlex.split(args.serve_args) if name == "now" else ())]
            proc, base = _start_server(src, extra)
            try:
                out[name][phase] = asyncio.run(_load(base, files, **load))
            finally:
                proc.terminate()
                proc.wait(30)
    for n in (32, 64):
        out[f"throughput_ratio_closed_{n}"] = (out["now"][f"closed_{n}"]["throughput_per_s"]
                                               / out["today"][f"closed_{n}"]["throughput_per_s"])  # fmt: skip
    return out


# ---------------------------------------------------------------- fracdet predict over a folder
def predict(checkouts: dict[str, Path | None], images: list[str]) -> dict:
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        listing = Path(folder) / "inputs"
        listing.mkdir()
        for k, path in enumerate(images):  # links: the same files, in the shuffled order, for both
            (listing / f"{k:05d}{Path(path).suffix}").symlink_to(Path(path).resolve())
        for name, src in checkouts.items():
            table = Path(folder) / f"{name}.csv"
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fracdet", "predict", str(listing), "--out", str(table),
                            *_same_model_args(src)],
                           env=_env(src), cwd=REPO, check=False, capture_output=True)  # fmt: skip
            elapsed = time.perf_counter() - started
            import pandas as pd

            rows = pd.read_csv(table)
            out[name] = {"images": len(rows), "answered": int(rows["probability"].notna().sum()),
                         "seconds": round(elapsed, 1), "images_per_s": len(rows) / elapsed,
                         "probabilities": rows.set_index("path")["probability"]}  # fmt: skip
        a, b = out["today"].pop("probabilities"), out["now"].pop("probabilities")
        both = a.notna() & b.notna()
        out["max_probability_difference"] = float((a[both] - b[both]).abs().max())
        out["answered_by_both"] = int(both.sum())
    out["ratio_images_per_s"] = out["now"]["images_per_s"] / out["today"]["images_per_s"]
    return out


# ---------------------------------------------------------------- a command's start
def startup(checkouts: dict[str, Path | None], image: str, runs: int = 5) -> dict:
    """Wall seconds of ``fracdet predict`` on one image, alternating checkouts: a command's fixed cost."""
    seconds: dict[str, list[float]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as folder:
        for k in range(runs + 1):
            for name, src in checkouts.items():
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "fracdet", "predict", image, "--out", f"{folder}/{name}.csv",
                                *_same_model_args(src)], env=_env(src), cwd=REPO, check=True,
                               capture_output=True)  # fmt: skip
                if k:  # the first round warms the file cache
                    seconds[name].append(time.perf_counter() - started)
    out: dict = {name: {"median_s": statistics.median(v), "runs": v} for name, v in seconds.items()}
    out["ratio_median"] = out["now"]["median_s"] / out["today"]["median_s"]
    return out


def main() -> None:
    global NOW_MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--baseline", default="68a96c8")
    parser.add_argument("--images", type=int, default=200, help="distinct images for e2e and the server")
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--closed-seconds", type=float, default=30.0)
    parser.add_argument("--predict-limit", type=int, default=0, help="images for predict (0: all)")
    parser.add_argument("--parts", default="e2e,server,predict")
    parser.add_argument("--serve-args", default="", help="more options for this checkout's `fracdet serve`, "
                        "e.g. '--threads 1'")  # fmt: skip
    parser.add_argument("--model", default=NOW_MODEL, help="the model this checkout runs (e.g. the float "
                        "fracatlas-localiser), and the baseline where it has it (else its own "
                        "fracatlas-default)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results-realtime.json")
    args = parser.parse_args()
    if args.worker:
        return worker()
    NOW_MODEL = args.model
    root = Path(args.data) / "images" if (Path(args.data) / "images").is_dir() else Path(args.data)
    every = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    random.Random(0).shuffle(every)
    with checkout(args.baseline) as baseline_src:
        checkouts = {"today": baseline_src, "now": None}
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                   text=True, check=False).stdout.strip()  # fmt: skip
        report: dict = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "baseline": args.baseline, "now": described, "command": " ".join(sys.argv), "data": args.data,
            "model_now": args.model,
        }  # fmt: skip
        parts = {"e2e": lambda: e2e(checkouts, every[: args.images + 5]),
                 "server": lambda: server(checkouts, every[: args.images], args),
                 "predict": lambda: predict(checkouts, every[: args.predict_limit or None]),
                 "startup": lambda: startup(checkouts, every[0])}  # fmt: skip
        for part in args.parts.split(","):
            report[part] = parts[part]()
            print(json.dumps(report[part], indent=1), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # what is measured is kept
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
