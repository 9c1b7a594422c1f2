"""Train a list of runs within a time budget on a GPU machine, and bundle each for the trip back.

A lent GPU machine has a few minutes, no network, none of the datasets and no fracdet install; it
returns at most 8 files of at most 16 MiB (64 MiB together). So training reads a pack (``fracdet pack``),
runs go ``--parallel`` at a time (small convolutional networks leave most of one GPU idle, so several
processes share it) until ``--deadline`` seconds have passed (a run still going is cut), and every run
with a checkpoint becomes one ``NAME.tar.gz`` in ``--out``: float16 weights of its best epoch plus
config, split manifest, history and log (about 9 MB for EfficientNet-Lite2; a bundle over
:data:`MAX_FILE`, such as a fused Lite1 + Lite2 model's 16.2 MiB, comes in parts ``NAME.tar.gz.0``,
``.1``, ...: at most 8 files and 64 MiB come back, so three such runs a call). A finished run carries its
validation fit (fusion, box edge, temperature, thresholds), made on the pack's pixels; a cut one is bundled
from ``best.pt`` and carries none. Either is judged only after ``fracdet calibrate RUN --data ORIGINALS
--out NEW`` has fitted it on the original validation files (``fracdet evaluate --split val`` keeps what the
model stores, and every split keeps a fused model's fusion).

``--fit-epochs`` sets one epoch count for all runs, the most that fits the deadline: every run of the
first wave times training steps on random batches at the same time as the others (so the shared GPU is
measured as the runs will share it), the augmentation is timed on this CPU, and the time left is divided
by the slower of the two per epoch. The count is clipped to the config's ``epochs`` and recorded in each
run's ``config.yaml``.

On the GPU machine, from the repository root (see docs/RESULTS.md, "GPU runs", for the whole recipe)::

    PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-384/manifest.csv \\
        --out $OUT --deadline 530 --parallel 7 --fit-epochs

Runs of one's own replace the default list, e.g. the localiser with and without stability training
(``SIZE=320 LITE=1 bash scripts/gpu_prepare.sh`` first)::

    PYTHONPATH=src:.device/site python3 scripts/gpu_runs.py --data .device/fracatlas-320/manifest.csv \\
        --config configs/localiser.yaml --set model=localiser_lite1 --set workers=3 --out $OUT --deadline 510 \\
        --parallel 5 --run stable-seed0 seed=0 stability.weight=1 --run plain-seed0 seed=0

Back here: ``tar -xzf NAME.tar.gz -C runs/gpu`` (in parts: ``cat NAME.tar.gz.? | tar -xz -C runs/gpu``) and
``fracdet evaluate runs/gpu/NAME --data ORIGINAL``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

#: name -> config overrides; the first three answer the issue's question (3 seeds), the rest change one
#: lever each against seed 0: ImageNet initialisation, augmentation, class balancing, input resolution.
DEFAULT_RUNS = {
    "gpu-seed0": [],
    "gpu-seed1": ["seed=1"],
    "gpu-seed2": ["seed=2"],
    "lever-scratch-seed0": ["pretrained=false"],
    "lever-no-augment-seed0": [f"augment.{k}=0" for k in ("hflip", "rotation", "scale", "translate", "contrast")],
    "lever-no-balance-seed0": ["balance=none"],
    "lever-260px-seed0": ["image_size=260"],
}
KEEP = ("config.yaml", "splits.csv", "metrics.csv", "run.json", "curves.png", "train.log")
MAX_FILE = 15 * 2**20  # a file that comes back from the GPU machine is at most 16 MiB
# The timm fracdet was tested with, zipped by scripts/gpu_prepare.sh, goes before the machine's own: the
# anti-aliased networks need timm>=1.0.7 (BlurPool2d's zero padding), and the machine's may be older.
CARRIED_TIMM = Path(__file__).resolve().parents[1] / ".device" / "timm.zip"
if CARRIED_TIMM.exists():
    sys.path.insert(0, str(CARRIED_TIMM))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(CARRIED_TIMM), os.environ.get("PYTHONPATH"))))
RUN_ENV = {**os.environ, "FRACDET_PROGRESS": "0", "OMP_NUM_THREADS": "2"}  # each run's own process
FALLBACK_EPOCHS = 15  # when --fit-epochs cannot measure
STARTUP_S = 60  # per wave: interpreter, imports, pixel cache, model build, final calibration and export


def bundle(run: Path, out: Path) -> list[Path]:
    """``out/NAME.tar.gz`` (or its parts) with float16 weights of the run's best epoch and its records; none
    without any."""
    from fracdet.models import load, save_model

    if (run / "model.json").is_file():
        model = load(run)
    elif (run / "checkpoints" / "best.pt").is_file():
        model = load(run / "checkpoints" / "best.pt")
        model.meta["cut_at_deadline"] = True
    else:
        return []
    staging = out / "staging" / run.name
    save_model(model, staging, half=True)
    for name in KEEP:
        if (run / name).is_file():
            shutil.copy2(run / name, staging / name)
    target = out / f"{run.name}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(staging, arcname=run.name)
    shutil.rmtree(out / "staging")
    return _split(target)


def _split(path: Path) -> list[Path]:
    """``[path]``, or when it is over :data:`MAX_FILE` the parts ``path.0``, ``path.1``, ... that replace it."""
    if path.stat().st_size <= MAX_FILE:
        return [path]
    parts = []
    with path.open("rb") as whole:
        while chunk := whole.read(MAX_FILE):
            parts.append(path.with_name(f"{path.name}.{len(parts)}"))
            parts[-1].write_bytes(chunk)
    path.unlink()
    return parts


def recipes(args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> overrides: the ``--run`` definitions when given, else :data:`DEFAULT_RUNS`."""
    return {name: list(overrides) for name, *overrides in args.run} if args.run else DEFAULT_RUNS


def _configs(args: argparse.Namespace, names: list[str]) -> dict:
    from fracdet.training import load_config

    runs = recipes(args)
    return {name: load_config(args.config, [*runs[name], *args.set]) for name in names}


def training_rate(config, until: float, seconds: float = 8.0) -> float:
    """Training images per second of ``config``'s model on random batches, timed from ``until`` for ``seconds``.

    The network is the one the run trains (:func:`fracdet.training.trainer.initial_model`: a fused model
    holds all its parts), and with stability training each step scores every image twice, as the run does.
    Processes started together wait (warming up) until the same wall-clock time, so each one measures
    its rate while all the others train too: the GPU is shared as it will be by the real runs.
    """
    import torch

    from fracdet.models import get_spec
    from fracdet.models.predict import normalise, read_outputs
    from fracdet.training.trainer import initial_model

    preprocess = get_spec(config.model).preprocess  # its mean and std (the side is the config's)
    size, batch = config.input_size, config.batch_size
    scored = batch * (2 if config.stability.weight > 0 else 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = initial_model(config)[0].to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (scored, 1, size, size), dtype=torch.uint8, device=device)
    y = torch.randint(0, 2, (scored,), device=device).float()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            margins = read_outputs(model(normalise(x, preprocess)))[0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margins, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the real loop synchronises every step too

    step()
    while time.time() < until:
        step()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or steps < 3:
        step()
        steps += 1
    return batch * steps / (time.perf_counter() - started)


def fit_epochs(args: argparse.Namespace, configs: dict, train_images: int, val_images: int, seconds: float) -> int:
    """The most epochs every run of a wave can take within ``seconds`` (at least 1, at most ``epochs``)."""
    import numpy as np
    import torch

    from fracdet.training.augment import build_augmentation

    started = time.monotonic()
    until = time.time() + 30  # imports and model builds of every process fit in this
    probes = {
        name: subprocess.Popen([sys.executable, __file__, "--data", args.data, "--out", args.out, "--config",
                                args.config, *[x for kv in args.set for x in ("--set", kv)],
                                *[x for run in args.run for x in ("--run", *run)], "--only", name,
                                "--probe-until", str(until)], stdout=subprocess.PIPE, text=True, env=RUN_ENV)
        for name in configs
    }  # fmt: skip
    rates = {}
    for name, probe in probes.items():
        try:
            printed = probe.communicate(timeout=max(5.0, until - time.time() + 60))[0]
        except subprocess.TimeoutExpired:
            probe.kill()
            printed = ""
        rates[name] = float(printed.split()[-1])  # IndexError or ValueError when the probe failed
    gpu_s = max((train_images + val_images / 3) / rate for rate in rates.values())

    augmented = [c for c in configs.values() if c.augment.enabled()]
    cpu_s = 0.0
    if augmented:
        torch.set_num_threads(1)
        size = max(c.input_size for c in augmented)
        augment = build_augmentation(augmented[0].augment)
        image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, size, size), dtype=np.uint8))
        clock = time.perf_counter()
        for _ in range(50):
            augment(image)
        augment_s = (time.perf_counter() - clock) / 50
        cores = max(1, (os.cpu_count() or 1) - len(configs))  # each run's main process keeps one core busy
        cpu_s = len(augmented) * train_images * augment_s / cores

    epoch_s = 1.3 * max(gpu_s, cpu_s)  # 1.3: loader restarts, checkpoints, curves
    seconds -= time.monotonic() - started
    epochs = int(min(max(c.epochs for c in configs.values()), max(1, seconds // epoch_s)))
    rate_text = ", ".join(f"{n} {r:.0f}" for n, r in rates.items())
    print(f"fit-epochs: training images/s with all {len(configs)} sharing the device: {rate_text}; "
          f"augmentation needs {cpu_s:.0f} s of the CPU per epoch -> {epoch_s:.0f} s per epoch "
          f"-> {epochs} epochs in {seconds:.0f} s", flush=True)  # fmt: skip
    return epochs


def prewarm(data: str, sizes: set[int]) -> tuple[int, int]:
    """Decode the pack once per size into the pixel cache, so parallel runs only read it; (train, val) counts."""
    from fracdet import load_dataset
    from fracdet.data.pixels import load_pixels

    table = load_dataset(data)
    for size in sorted(sizes):
        load_pixels(table, size, desc=f"decoding at {size} px")
    counts = table["split"].value_counts()
    return int(counts.get("train", 0)), int(counts.get("val", 0))


def summary(runs_dir: Path, names: list[str]) -> str:
    """One line per run: epochs done, best epoch and its validation AUC, seconds."""
    import pandas as pd

    lines = [f"{'run':26} {'epochs':>6} {'best':>4} {'val AUC':>7} {'seconds':>7}"]
    for name in names:
        metrics = runs_dir / name / "metrics.csv"
        if not metrics.is_file():
            lines.append(f"{name:26} no epoch finished")
            continue
        frame = pd.read_csv(metrics)
        best = frame[frame["best"]].iloc[-1]
        lines.append(f"{name:26} {len(frame):>6} {int(best['epoch']):>4} {best['val_auc']:>7.4f} "
                     f"{frame['seconds'].sum():>7.0f}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="manifest of a pack (fracdet pack)")
    parser.add_argument("--config", default="configs/default-gpu.yaml")
    parser.add_argument("--out", required=True, help="where the bundles go ($OUT on the GPU machine)")
    parser.add_argument("--runs-dir", default="/tmp/fracdet-runs")
    parser.add_argument("--deadline", type=float, default=420, help="seconds after which no run continues")
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        default=[],
        metavar="RUN",
        help="a run of your own: NAME [KEY=VALUE ...] (repeat; replaces the default list)",
    )
    parser.add_argument("--only", nargs="+", help="names from the run list to run (default: all, in order)")
    parser.add_argument("--set", action="append", default=[], help="override for every run (KEY=VALUE)")
    parser.add_argument("--parallel", type=int, default=1, help="runs training at the same time")
    parser.add_argument("--fit-epochs", action="store_true", help="as many epochs as fit the deadline")
    parser.add_argument("--probe-until", type=float, help=argparse.SUPPRESS)  # internal: see training_rate
    args = parser.parse_args()
    if args.probe_until:
        print(training_rate(_configs(args, args.only)[args.only[0]], args.probe_until))
        return 0

    started = time.monotonic()
    out, runs_dir = Path(args.out), Path(args.runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = recipes(args)
    unknown = set(args.only or ()) - set(runs)
    if unknown:
        parser.error(f"not in the run list: {', '.join(sorted(unknown))}")
    names = args.only or list(runs)
    configs = _configs(args, names)
    train_images, val_images = prewarm(args.data, {c.input_size for c in configs.values()})
    extra = list(args.set)
    if args.fit_epochs:
        waves = -(-len(names) // args.parallel)
        left = args.deadline - (time.monotonic() - started) - STARTUP_S * waves
        parallel = min(args.parallel, len(names))
        per_wave = {n: configs[n] for n in names[:parallel]}
        try:
            epochs = fit_epochs(args, per_wave, train_images, val_images, left / waves)
        except (ValueError, IndexError) as exc:  # a probe died: its error is in the output above
            epochs = FALLBACK_EPOCHS
            print(f"fit-epochs failed ({exc}); {epochs} epochs, the deadline cuts what does not fit", flush=True)
        extra.append(f"epochs={epochs}")

    waiting, running = list(names), {}
    while waiting or running:
        left = args.deadline - (time.monotonic() - started)
        while waiting and len(running) < args.parallel and left >= 30:
            name = waiting.pop(0)
            overrides = [x for kv in [*runs[name], *extra] for x in ("--set", kv)]
            command = [sys.executable, "-m", "fracdet", "train", "--config", args.config, "--data", args.data,
                       "--out", str(runs_dir / name), *overrides]  # fmt: skip
            print(f"{name}: {' '.join(command[1:])} ({left:.0f} s left)", flush=True)
            log = (runs_dir / f"{name}.log").open("w")  # closed when the process ends
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=RUN_ENV), log)
        if left < 30 and waiting:
            print(f"not started, {left:.0f} s left: {', '.join(waiting)}", flush=True)
            waiting.clear()
        for name, (process, log) in list(running.items()):
            if process.poll() is None and left > 0:
                continue
            if process.poll() is None:
                process.kill()
                process.wait()
                print(f"{name}: cut at the deadline", flush=True)
            elif process.returncode:
                print(f"{name}: failed with status {process.returncode}", flush=True)
            log.close()
            if (runs_dir / name).is_dir():
                shutil.copy2(runs_dir / f"{name}.log", runs_dir / name / "train.log")
            del running[name]
            for bundled in bundle(runs_dir / name, out):
                print(f"{name}: {bundled} ({bundled.stat().st_size / 2**20:.1f} MiB)", flush=True)
        time.sleep(1)
    print(summary(runs_dir, names), flush=True)
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
