"""Training throughput: the paper's plain pipeline, fracdet's, and the limit the arithmetic sets (issue 19).

    python benchmarks/train_throughput.py --data ../shared/data/fracatlas [--config configs/default-gpu.yaml]
        [--image-size 384] [--batch-size 32] [--steps 30] [--workers 8] [--compile]
        [--localiser-config configs/localiser.yaml] [--out benchmarks/results-train-throughput.json]

Images per second of training steps (forward, backward, optimiser step) after ``--warmup`` steps, for:

* ``plain``: what the paper's code does: torchvision ``ImageFolder`` over the class folders, a ``DataLoader``
  with ``--workers`` processes decoding and transforming each image every epoch (grey to 3 channels, resize,
  flip, affine, colour jitter, to tensor, normalise), float32, the default memory layout;
* ``fracdet``: the training loop's own pipeline: pixels decoded once at the training size and cached
  (:func:`fracdet.data.pixels.load_pixels`), the recipe's augmentation seeded per image
  (:class:`fracdet.training.augment.AugmentedImages`, re-encoding included), channels-last, bfloat16 autocast
  on a GPU, sums kept on the device (no host sync per step), ``torch.compile`` with ``--compile``; also for a
  localiser recipe (``--localiser-config``; the plain pipeline cannot train one: it has no masks);
* ``fracdet_augment_on_device``: the same with ``augment_on: device``: the loader hands over the stored
  pixels and each batch is augmented on the training device (the same batches);
* ``limit``: the device's arithmetic rate (a large matrix product in the step's precision, measured here)
  divided by the model's floating-point operations per training image (three times the forward's, which
  PyTorch's ``FlopCounterMode`` counts); each pipeline's fraction of it is reported.

Both pipelines train the same network of the same recipe on the same images, with the same step (forward,
``fracdet.training.losses.task_loss``, backward, AdamW); the plain one reads its loss every step, as the
paper's loop prints it, fracdet's keeps it on the device as the training loop does. On
a CPU the figures are small-scale (use ``--image-size 128 --steps 5``) and say little about a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/fracatlas")
    parser.add_argument("--splits", default="splits/fracatlas_seed0.csv")
    parser.add_argument("--config", default="configs/default-gpu.yaml", help="the classifier recipe")
    parser.add_argument("--localiser-config", default=None, help="also measure this localiser recipe")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="data-loading processes of both pipelines")
    parser.add_argument("--compile", action="store_true", help="fracdet's pipeline through torch.compile")
    parser.add_argument("--out", default="benchmarks/results-train-throughput.json")
    args = parser.parse_args()

    from fracdet.training import load_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = [f"image_size={args.image_size}"] + ([f"batch_size={args.batch_size}"] if args.batch_size else [])
    classifier = load_config(args.config, [*overrides, f"workers={args.workers}", f"compile={args.compile}"])
    results: dict = {
        "command": "python benchmarks/train_throughput.py " + " ".join(_options(args)),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    peak = _peak_flops(device)
    results["peak_tflops"] = round(peak / 1e12, 3)
    table = _table(args.data, args.splits)

    plain = _measure(_plain_batches(table, classifier), classifier, device, args, plain=True)
    fast = _measure(_fracdet_batches(table, classifier, device), classifier, device, args, plain=False)
    on_device = classifier.with_overrides(["augment_on=device"])
    fast_device = _measure(_fracdet_batches(table, on_device, device), on_device, device, args, plain=False)
    flops = _flops_per_image(classifier, device)
    limit = peak / flops
    results["classifier"] = {
        "model": classifier.model, "image_size": args.image_size, "batch_size": classifier.batch_size,
        "gflops_per_training_image": round(flops / 1e9, 2), "limit_images_per_s": round(limit, 1),
        "plain_images_per_s": round(plain, 1), "fracdet_images_per_s": round(fast, 1),
        "fracdet_augment_on_device_images_per_s": round(fast_device, 1),
        "ratio_fracdet_to_plain": round(fast / plain, 2),
        "ratio_fracdet_augment_on_device_to_plain": round(fast_device / plain, 2),
        "plain_fraction_of_limit": round(plain / limit, 3), "fracdet_fraction_of_limit": round(fast / limit, 3),
    }  # fmt: skip
    if args.localiser_config:
        localiser = load_config(args.localiser_config, [*overrides, f"workers={args.workers}",
                                                        f"compile={args.compile}"])  # fmt: skip
        fast = _measure(_fracdet_batches(table, localiser, device), localiser, device, args, plain=False)
        on_device = localiser.with_overrides(["augment_on=device"])
        fast_device = _measure(_fracdet_batches(table, on_device, device), on_device, device, args, plain=False)
        flops = _flops_per_image(localiser, device)
        results["localiser"] = {
            "model": localiser.model, "image_size": args.image_size, "batch_size": localiser.batch_size,
            "gflops_per_training_image": round(flops / 1e9, 2), "limit_images_per_s": round(peak / flops, 1),
            "fracdet_images_per_s": round(fast, 1), "fracdet_fraction_of_limit": round(fast * flops / peak, 3),
            "fracdet_augment_on_device_images_per_s": round(fast_device, 1),
            "fracdet_augment_on_device_fraction_of_limit": round(fast_device * flops / peak, 3),
        }  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _options(args: argparse.Namespace) -> list[str]:
    options = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            options.append(flag)
        elif value not in (None, False):
            options.append(f"{flag} {value}")
    return options


def _table(data: str, splits: str):
    from fracdet.data import load_dataset
    from fracdet.data.split import apply_manifest

    table = apply_manifest(load_dataset(data), splits)
    train = table[table["split"] == "train"].reset_index(drop=True)
    train.attrs.update(table.attrs)
    return train


def _plain_batches(table, config):
    """The paper's pipeline: ImageFolder, a DataLoader, per-image PIL transforms every epoch; over the same
    training files as fracdet's (FracAtlas holds truncated JPEG files, which stop a plain loader)."""
    from torchvision import datasets, transforms

    from fracdet.data.pixels import load_pixels

    readable = load_pixels(table, config.input_size, desc="checking")
    root = Path(table.attrs["root"])
    keep = {str((root / p).resolve()) for p in readable.table["path"]}

    a = config.augment
    steps = [transforms.Grayscale(3), transforms.Resize((config.input_size, config.input_size))]
    if a.hflip:
        steps.append(transforms.RandomHorizontalFlip(a.hflip))
    if a.rotation or a.scale or a.translate:
        steps.append(transforms.RandomAffine(a.rotation, translate=(a.translate, a.translate) if a.translate else None,
                                             scale=(1 - a.scale, 1 + a.scale) if a.scale else None))  # fmt: skip
    if a.contrast:
        steps.append(transforms.ColorJitter(brightness=a.contrast, contrast=a.contrast))
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    folders = {(root / p).resolve().parent.parent for p in readable.table["path"]}
    if len(folders) != 1:
        raise ValueError("the plain pipeline needs one class-folder root (ImageFolder)")
    dataset = datasets.ImageFolder(str(folders.pop()), transform=transforms.Compose(steps),
                                   is_valid_file=lambda path: str(Path(path).resolve()) in keep)  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=config.workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=config.workers > 0)  # fmt: skip
    while True:
        for x, y in loader:
            yield x, y, None


def _fracdet_batches(table, config, device: torch.device):
    """fracdet's pipeline: cached pixels, the recipe's augmentation seeded per image, masks for a localiser;
    with ``augment_on: device`` the loader hands over the stored pixels and the batch is augmented on
    ``device``, as the training loop does."""
    from fracdet.data.pixels import load_pixels
    from fracdet.models import get_spec
    from fracdet.training.augment import AugmentedImages, EpochLoader, build_augmentation, epoch_draws

    pixels = load_pixels(table, config.input_size, desc=f"decoding at {config.input_size} px (cached)")
    labels = pixels.table["label"].to_numpy(np.int64)
    annotations = None
    if get_spec(config.model).task == "localise":
        annotations = [(b if isinstance(b, list) else [], p if isinstance(p, list) else [])
                       for b, p in zip(pixels.table["boxes"], pixels.table["polygons"], strict=True)]  # fmt: skip
    dataset = AugmentedImages(pixels.images, labels, build_augmentation(config.augment), annotations=annotations,
                              mask_target=config.localise.target, seed=config.seed,
                              defer=config.augment_on == "device")  # fmt: skip
    epoch = 0
    with EpochLoader(dataset, config.workers, pin_memory=torch.cuda.is_available()) as loader:
        while True:
            order = epoch_draws(labels, config.balance, config.seed, epoch)
            batches = [order[i : i + config.batch_size] for i in range(0, len(order) - config.batch_size + 1,
                                                                        config.batch_size)]  # fmt: skip
            for (x, y, *masks), batch in zip(loader(batches), batches, strict=True):
                mask = masks[0] if masks else None
                if dataset.defer:
                    x, mask = x.to(device, non_blocking=True), None if mask is None else mask.to(device)
                    x, mask = dataset.augment_batch(x, mask, batch)
                yield x, y, mask
            epoch += 1


def _measure(batches, config, device: torch.device, args: argparse.Namespace, *, plain: bool) -> float:
    """Images per second of training steps on ``batches`` (after the warm-up)."""
    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg, get_spec
    from fracdet.models.predict import normalise
    from fracdet.training.losses import task_loss

    spec = get_spec(config.model).preprocess
    preprocess = PreprocessCfg(config.input_size, spec.mean, spec.std)
    torch.manual_seed(0)
    model = create_model(config.model, pretrained=False, input_size=config.input_size).to(device)
    if not plain:
        model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if (config.compile and not plain) else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr)
    amp = device.type == "cuda" and config.amp and not plain
    sums = torch.zeros(2, device=device)
    seen, started = 0, None
    for step, (x, y, masks) in enumerate(batches):
        if step == args.warmup:
            _sync(device)
            started, seen = time.perf_counter(), 0
        if step == args.warmup + args.steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x if plain else normalise(x, preprocess)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = network(x)
        loss = task_loss(outputs, y, masks.to(device) if masks is not None else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if plain:
            sums[0] += loss.item()  # the plain loop reads its loss every step
        else:
            sums[0] += loss.detach()
        seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - started)


def _flops_per_image(config, device: torch.device) -> float:
    """Floating-point operations of one training step per image: three times the forward's.

    The forward is counted by PyTorch's ``FlopCounterMode``; the backward is taken as twice the forward (the
    gradients with respect to the inputs and to the weights each cost about one forward), the usual rule.
    The counter's own figure for the backward is not used: it ignores a grouped convolution's groups, and
    counts an EfficientNet-Lite's depthwise backward 30-60 times too high (64 groups: 77 MFLOPs counted
    for 2.4 computed).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from fracdet.models import create_model

    model = create_model(config.model, pretrained=False, input_size=config.input_size).to(device)
    batch = 2
    x = torch.randn(batch, 3, config.input_size, config.input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3 * counter.get_total_flops() / batch


def _peak_flops(device: torch.device) -> float:
    """The device's arithmetic rate in the training step's precision: a large matrix product, timed."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    runs, started = 10, time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
