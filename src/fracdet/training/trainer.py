"""The training loop: one run folder per run, validation every epoch, atomic checkpoints, exact resume.

A run folder holds everything needed to trace a result::

    config.yaml        the TrainConfig (what `--resume` and `fracdet evaluate` read back)
    splits.csv         the manifest the run trained on (path, label, group, split, ...)
    run.json           data root, device, fracdet/torch versions, files left out as unreadable
    metrics.csv        one row per epoch: train loss/accuracy, validation loss/accuracy/AUC, lr, seconds
    curves.png         the same as pictures
    checkpoints/last.pt   full state after the last finished epoch (model, optimiser, schedule, history)
    checkpoints/partial.pt  the same within the epoch under way, every ``checkpoint_minutes``, with the
                       batches done, their running sums and the random state (gone when the epoch ends)
    checkpoints/best.pt   weights of the best epoch by the monitored validation metric (with ``ema``, the
                       moving average of the weights: what every epoch validates, and what is exported)
    model.safetensors + model.json   the best weights, with preprocessing, the temperature and the
                       operating thresholds fitted on validation: what evaluation and serving load

Randomness is re-seeded from ``(seed, epoch)`` at the start of every epoch, every augmentation from its
image's draw, and a checkpoint within an epoch keeps the random state it reached, so a run interrupted at
any point and resumed with ``--resume`` reaches the same weights as an uninterrupted one, losing at most
``checkpoint_minutes`` of work when killed, and none when asked to stop (SIGTERM or Ctrl-C to ``fracdet
train``: :mod:`fracdet.training.stopping`).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from timm.utils import ModelEmaV3
from torch import nn

from fracdet.data.pixels import PixelSet, load_pixels
from fracdet.models import TrainedModel, create_model, get_spec, rebuilt, save_model
from fracdet.models._registry import PreprocessCfg, build_options
from fracdet.models.predict import normalise, predict_margins, read_outputs, select_device
from fracdet.training.augment import (
    AugmentedImages,
    Draw,
    EpochLoader,
    build_augmentation,
    build_twin,
    epoch_draws,
    epoch_indices,
)
from fracdet.training.calibrate import calibrate
from fracdet.training.checkpoint import RunExistsError, load_checkpoint, save_checkpoint, write_json
from fracdet.training.config import ConfigError, TrainConfig
from fracdet.training.distributed import Ranks, current_ranks
from fracdet.training.losses import split_views, stability_loss, task_loss
from fracdet.training.stopping import StopRequest
from fracdet.utils.atomic import atomic_file, save_figure
from fracdet.utils.cache import FeatureCache
from fracdet.utils.lock import exclusive
from fracdet.utils.progress import progress_bar

__all__ = ["RunExistsError", "TrainResult", "initial_model", "train"]

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict], None]

#: Training steps between two readings of the running loss for the progress bar (each waits for the GPU).
POSTFIX_EVERY = 20


@dataclass
class TrainResult:
    """What :func:`train` leaves behind (everything is also in ``out_dir``)."""

    out_dir: Path
    history: pd.DataFrame
    best_epoch: int  #: 0 when the sitting ended (``stop_after``, ``stop``) before the run did: no model yet
    stopped_early: bool
    stopped_as_asked: bool = False  #: ``stop`` was set: the run is saved where it stopped, for ``resume``


def _preprocess(config: TrainConfig) -> PreprocessCfg:
    spec = get_spec(config.model).preprocess
    return PreprocessCfg(config.input_size, spec.mean, spec.std)


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)


def _make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    s, epochs = config.schedule, config.epochs
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.optimizer.lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        )
    if s.name == "plateau":
        mode = "min" if config.monitor == "loss" else "max"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=s.gamma, patience=s.patience, min_lr=s.min_lr
        )
    floor = s.min_lr / config.optimizer.lr

    def factor(epoch: int) -> float:
        if epoch < s.warmup_epochs:
            return (epoch + 1) / (s.warmup_epochs + 1)
        if s.name == "cosine":
            progress = (epoch - s.warmup_epochs) / max(1, epochs - s.warmup_epochs)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if s.name == "step":
            return s.gamma ** ((epoch - s.warmup_epochs) // s.step_size)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _score(margins: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    loss = float(np.mean(np.logaddexp(0.0, margins) - labels * margins))  # cross-entropy of the softmax
    accuracy = float(np.mean((margins >= 0) == (labels == 1)))
    auc = float(roc_auc_score(labels, margins)) if len(np.unique(labels)) == 2 else float("nan")
    return {"loss": loss, "accuracy": accuracy, "auc": auc}


def _improved(value: float, best: float | None, monitor: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if monitor == "loss" else value > best


def _saved_work(out_dir: Path) -> list[Path]:
    """What the run in ``out_dir`` saved of what it learnt: checkpoints, epochs' rows, the finished model.

    One notion for both ways in: a new run refuses a folder holding any of it (never overwritten), and
    ``--resume`` of a folder holding none of it (stopped within its first ``checkpoint_minutes``) starts
    from epoch 1; one holding some of it but not ``last.pt`` is refused rather than trained from scratch.
    """
    checkpoints = out_dir / "checkpoints"
    saved = (checkpoints / "last.pt", checkpoints / "partial.pt", checkpoints / "best.pt",
             out_dir / "metrics.csv", out_dir / "model.json", out_dir / "model.safetensors")  # fmt: skip
    return [path for path in saved if path.exists()]


def _prepare_run_folder(config: TrainConfig, manifest: pd.DataFrame, out_dir: Path, resume: bool) -> None:
    if resume:
        return
    if saved := _saved_work(out_dir):
        raise RunExistsError(
            f"{out_dir} already holds a run ({', '.join(p.name for p in saved)}): pass --resume to continue it, "
            "or choose another --out"
        )
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    config.save(out_dir / "config.yaml")
    keep = [c for c in ("path", "label", "group", "split", "region", "view") if c in manifest.columns]
    with atomic_file(out_dir / "splits.csv") as tmp:
        manifest[keep].to_csv(tmp, index=False)


def plot_curves(history: pd.DataFrame, path: Path, *, selected_on: str = "val") -> Path:
    """Loss, accuracy and AUC per epoch (train and validation), the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    epochs = history["epoch"]
    for ax, metric in zip(axes, ("loss", "accuracy", "auc"), strict=True):
        for split in ("train", "val", "test"):
            column = f"{split}_{metric}"
            if column in history and history[column].notna().any():
                ax.plot(epochs, history[column], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if history["best"].any():
            ax.axvline(history.loc[history["best"], "epoch"].iloc[-1], color="grey", ls="--", lw=1)
        ax.legend()
    if selected_on == "test":
        fig.suptitle("checkpoint selected on TEST (paper reproduction only; not an honest estimate)", color="red")
    fig.tight_layout()
    return save_figure(fig, path)


def train(
    config: TrainConfig | None,
    manifest: pd.DataFrame,
    out_dir: str | Path,
    *,
    resume: bool = False,
    cache: FeatureCache | None = None,
    on_epoch_end: EpochHook | None = None,
    stop_after: int | None = None,
    ranks: Ranks | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train ``config.model`` on the ``train`` rows of ``manifest``, selecting on ``val``.

    Args:
        config: the run's config; with ``resume=True`` it may be ``None`` (read from the run folder),
            and when given it may differ from the saved one only in ``TrainConfig.RESUMABLE_KEYS``.
        manifest: a sample table with a ``split`` column (``train``, ``val``, optionally ``test``) and
            ``attrs["root"]``; rows of other splits are ignored.
        out_dir: the run folder (see the module docstring).
        resume: continue from ``checkpoints/last.pt`` (or ``partial.pt`` within an epoch); a run that
            stopped before it saved anything starts again from its first epoch.
        cache: pixel cache (default: the feature cache).
        on_epoch_end: ``hook(epoch, row)`` after each epoch's checkpoint is written (tests use it to
            interrupt a run).
        stop_after: stop once this many epochs are done (counting those of earlier sittings), leaving the
            run folder to ``resume`` later (a sitting on a shared machine); no model is written yet.
        ranks: this process's place among training processes (:mod:`fracdet.training.distributed`);
            default: the process group this process is in, or one process.
        stop: once set (:func:`fracdet.training.stopping.stop_on_signals` sets it on SIGTERM or Ctrl-C), the
            run ends after the batch in hand, saved there (``partial.pt``) for ``resume``, or, set after the
            last batch, before the model is written (set while it is written, it is finished); one process only.

    Raises:
        FolderInUseError: another process trains in ``out_dir`` (a second ``--resume`` of a run still
            training would interleave their checkpoints).
    """
    ranks = ranks or current_ranks()
    out_dir = Path(out_dir)
    if ranks.main and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir, "a training run") if ranks.main else nullcontext():
        return _train(config, manifest, out_dir, resume=resume, cache=cache, on_epoch_end=on_epoch_end,
                      stop_after=stop_after, ranks=ranks, stop=stop)  # fmt: skip


def _train(
    config: TrainConfig | None,
    manifest: pd.DataFrame,
    out_dir: Path,
    *,
    resume: bool,
    cache: FeatureCache | None,
    on_epoch_end: EpochHook | None,
    stop_after: int | None,
    ranks: Ranks,
    stop: StopRequest | None,
) -> TrainResult:
    if ranks.distributed and stop is not None:
        raise ValueError("stop: a run on several processes cannot stop on one process's request")
    if resume:
        saved = TrainConfig.from_dict(_read_yaml(out_dir / "config.yaml"))
        try:
            config = saved if config is None else saved.resumed_with(config)
        except ConfigError as exc:
            raise ConfigError(f"--resume: {out_dir / 'config.yaml'}: {exc}") from None
        for key in saved.differences(config):  # only what leaves the weights as they would be
            log.info("resuming with %s changed (the run's config.yaml keeps what it started with)", key)
    assert config is not None
    if "split" not in manifest or not {"train", "val"} <= set(manifest["split"].dropna()):
        raise ValueError("the manifest needs rows in the 'train' and 'val' splits (make one with `fracdet split`)")
    if ranks.main:
        _prepare_run_folder(config, manifest, out_dir, resume)
    ranks.barrier()

    torch.manual_seed(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = select_device(config.device)
    if ranks.distributed and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    preprocess = _preprocess(config)
    wanted = ("train", "val", "test") if config.select_on == "test" else ("train", "val")
    rows = manifest[manifest["split"].isin(wanted)]
    conflicts = _label_conflicts(rows) if config.drop_label_conflicts else rows.iloc[:0]
    rows = rows.drop(index=conflicts.index)
    # Each split's rows together, in their own order: each split is then a slice of the memory-mapped
    # pixel store, not a copy of it in memory (load_pixels).
    rows = rows.sort_values("split", key=lambda s: s.map(wanted.index), kind="stable").reset_index(drop=True)
    rows.attrs.update(manifest.attrs)
    pixels = load_pixels(rows, preprocess.input_size, cache=cache, desc=f"decoding at {preprocess.input_size} px")
    parts = {s: _subset(pixels, s) for s in wanted}
    for split, (images, _) in parts.items():
        if len(images) == 0:
            raise ValueError(f"no readable images in the {split!r} split")
    model, composition = initial_model(config)
    info = {
        **composition,  # what a run stopped before its end is loaded as (a fused model, not config.model)
        "data_root": manifest.attrs.get("root"),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "input_size": preprocess.input_size,
        "images": {s: len(parts[s][0]) for s in wanted},
        "skipped": pixels.skipped.to_dict(orient="records"),
        "dropped_label_conflicts": conflicts["path"].tolist(),
        "processes": ranks.world,
    }
    if ranks.main:
        write_json(out_dir / "run.json", info)

    model = model.to(device).to(memory_format=torch.channels_last)
    network = _wrap(model, ranks, device)  # what the training steps run; `model` is the plain module
    averaged = ModelEmaV3(model, decay=config.ema, use_warmup=True, warmup_power=3 / 4) if config.ema else None
    scored = model if averaged is None else averaged.module  # what is validated, selected and exported
    if config.compile:
        network = torch.compile(network)
    optimizer = _make_optimizer(config, model)
    train_images, train_labels = parts["train"]
    steps = math.ceil(len(epoch_indices(train_labels, config.balance, config.seed, 0)) / config.batch_size)
    schedule = _make_schedule(config, optimizer, steps)
    loss_weight = None
    if config.balance == "class_weights":
        counts = np.bincount(train_labels, minlength=2).astype(np.float32)
        loss_weight = torch.tensor(counts.sum() / (2 * np.maximum(counts, 1)), device=device)
    localise = get_spec(config.model).task == "localise"
    annotations = _annotations(pixels.table, "train") if localise else None
    dataset = AugmentedImages(train_images, train_labels, build_augmentation(config.augment),
                              annotations=annotations, mask_target=config.localise.target,
                              twin=build_twin(config.stability), seed=config.seed,
                              defer=config.augment_on == "device")  # fmt: skip
    stable = config.stability.weight > 0

    start_epoch, history, best, bad_epochs = 0, [], None, 0
    last_path, partial_path = out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "partial.pt"
    within = None  # the state saved within the epoch a resumed run starts in, if any
    if resume and not _saved_work(out_dir):
        # stopped within its first checkpoint_minutes: nothing learnt to lose, and every epoch's randomness
        # comes from the seed, so starting again is the resumption (an uninterrupted run's weights)
        log.info("%s saved nothing before it stopped: starting it from epoch 1", out_dir)
    elif resume:
        finished = load_checkpoint(last_path) if last_path.is_file() else None
        within = load_checkpoint(partial_path) if partial_path.is_file() else None
        if within is not None and within["epoch"] != (finished["epoch"] + 1 if finished else 0):
            within = None  # its epoch ended (and is in last.pt) before the run stopped
        state = within or finished or load_checkpoint(last_path)  # neither: "checkpoint not found"
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, best, bad_epochs = state["history"], state["best"], state["bad"]
        start_epoch = state["epoch"] if within else state["epoch"] + 1
        if within is not None:
            log.info("resuming %s in epoch %d, after %d of its batches", out_dir, start_epoch + 1, within["step"])
        else:  # epochs count from 1 where people read them
            log.info("resuming %s after epoch %d", out_dir, start_epoch)
    every_s = config.checkpoint_minutes * 60 if config.checkpoint_minutes and not ranks.distributed else 0.0

    stopped_early = False

    def stopped_as_asked(where: str) -> TrainResult:  # saved where it stopped: --resume goes on from there
        log.info("stopped (%s) %s; continue with --resume", stop.name, where)
        return TrainResult(out_dir, pd.DataFrame(history), 0, stopped_early, stopped_as_asked=True)

    # the loading processes start with the first epoch and stop when the loop ends, however it ends
    with EpochLoader(dataset, config.workers, pin_memory=device.type == "cuda") as loader:
        for epoch in range(start_epoch, config.epochs):
            if config.early_stopping and bad_epochs >= config.early_stopping:
                stopped_early = True
                break
            if stop_after is not None and epoch >= stop_after:
                log.info("stopping after epoch %d as asked; continue with --resume", epoch)
                return TrainResult(out_dir, pd.DataFrame(history), 0, False)
            if stop is not None and stop.is_set():  # asked while the last epoch ended (it is in last.pt) or before
                return stopped_as_asked(f"before epoch {epoch + 1} began")
            started = time.perf_counter() - (within["seconds"] if within else 0.0)
            torch.manual_seed(config.seed * 100_003 + epoch + 7_919 * ranks.rank)  # dropout of this epoch
            if within:  # where the interrupted sitting left the dropout's random numbers
                _set_random_state(within["random"])
            batches = _batches(epoch_draws(train_labels, config.balance, config.seed, epoch), config.batch_size, ranks)
            shards = [ranks.shard(batch) for batch in batches]
            done = within["step"] if within else 0
            stateful = {"model": model, "optimizer": optimizer, "schedule": schedule}
            if averaged is not None:
                stateful["ema"] = averaged.module
            average = None if averaged is None else partial(_average, averaged, model, epoch * len(batches))
            before = {"epoch": epoch, "history": history, "best": best, "bad": bad_epochs}
            save_within = None if ranks.distributed else partial(_save_within, partial_path, stateful, before,
                                                                 started)  # fmt: skip
            sums, stopped = _train_epoch(network, loader(shards[done:]), batches, shards, dataset=dataset,
                                         optimizer=optimizer, schedule=schedule, config=config, preprocess=preprocess,
                                         device=device, class_weight=loss_weight,
                                         desc=f"epoch {epoch + 1}/{config.epochs}", start=done,
                                         sums=within["sums"] if within else None, save=save_within, every_s=every_s,
                                         stop=stop, average=average)  # fmt: skip
            if stopped is not None:
                return stopped_as_asked(f"in epoch {epoch + 1} after {stopped} of its {len(batches)} batches, saved")
            within = None
            total_loss, total_change, correct, seen = ranks.sum(*sums)
            row = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": total_loss / seen,
                "train_accuracy": correct / seen,
            }
            if stable:  # mean stability loss (Huber of the score change) between images and their re-saved copies
                row["train_score_change"] = total_change / seen
            ranks.broadcast_buffers(model)  # every rank scores with rank 0's batch-norm statistics
            if scored is not model:
                ranks.broadcast_buffers(scored)
            for split in wanted[1:]:
                images, labels = parts[split]
                margins = predict_margins(scored, images[ranks.rank :: ranks.world], preprocess,
                                          batch_size=2 * config.batch_size, device=device)  # fmt: skip
                margins = ranks.gather(margins, len(images))
                row.update({f"{split}_{k}": v for k, v in _score(margins, labels).items()})
            value = row[f"{config.select_on}_{config.monitor}"]
            improved = _improved(value, best, config.monitor)
            row["best"] = improved
            row["seconds"] = round(time.perf_counter() - started, 1)
            history.append(row)
            if improved:
                best, bad_epochs = value, 0
                if ranks.main:
                    save_checkpoint(out_dir / "checkpoints" / "best.pt", {"model": scored.state_dict(), **row})
            else:
                bad_epochs += 1
            if config.schedule.name == "plateau":
                schedule.step(value)
            elif config.schedule.name != "onecycle":
                schedule.step()
            if ranks.main:
                save_checkpoint(
                    last_path, _run_state(stateful, epoch=epoch, history=history, best=best, bad=bad_epochs)
                )
                partial_path.unlink(missing_ok=True)  # the epoch is in last.pt now
                frame = pd.DataFrame(history)
                with atomic_file(out_dir / "metrics.csv") as tmp:
                    frame.to_csv(tmp, index=False)
                plot_curves(frame, out_dir / "curves.png", selected_on=config.select_on)
            ranks.barrier()  # the epoch's checkpoint is written before any rank goes on
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f acc %.3f auc %.3f%s",
                epoch + 1, row["train_loss"], row["val_loss"], row["val_accuracy"], row["val_auc"],
                " (best)" if improved else "",
            )  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

    if stop is not None and stop.is_set():  # asked during the last epoch's validation: --resume writes the model
        return stopped_as_asked("after the last epoch, before the model was written")
    history_frame = pd.DataFrame(history)
    best_state = load_checkpoint(out_dir / "checkpoints" / "best.pt")
    if ranks.main:  # calibration and thresholds on validation, once
        model.load_state_dict(best_state["model"])
        val_boxes = [b for b, _ in _annotations(pixels.table, "val")] if "boxes" in pixels.table else None
        _export(model, config, preprocess, parts["val"], out_dir, best_state, device, val_boxes, composition)
    ranks.barrier()
    return TrainResult(out_dir, history_frame, int(best_state["epoch"]), stopped_early)


def _train_epoch(
    network: nn.Module,
    loaded: Iterator[tuple[torch.Tensor, ...]],
    batches: list[list[Draw]],
    shards: list[list[Draw]],
    *,
    dataset: AugmentedImages,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: TrainConfig,
    preprocess: PreprocessCfg,
    device: torch.device,
    class_weight: torch.Tensor | None,
    desc: str,
    start: int = 0,
    sums: list[float] | None = None,
    save: Callable[[int, list[float]], None] | None = None,
    every_s: float = 0.0,
    stop: StopRequest | None = None,
    average: Callable[[int], None] | None = None,
) -> tuple[list[float], int | None]:
    """The training steps of one epoch: ``loaded`` are the collated ``shards`` (this process's part of each of
    ``batches``) from batch ``start`` on, those before it done in an earlier sitting whose ``sums`` go on.
    Returns this process's sums of the loss, the score change, correct verdicts and images. ``save(step,
    sums)`` is called with the batches done so far every ``every_s`` seconds of training (0: never), and
    when ``stop`` is set, which ends the epoch there: the number of batches done is then returned beside the
    sums, else ``None`` (asked during the epoch's last batch, the epoch ends, and its checkpoint holds it).
    ``average(n)``, when given, folds the weights into their moving average after the epoch's ``n``-th step."""
    stable = config.stability.weight > 0
    use_amp = config.amp and device.type == "cuda"
    network.train()
    # Sums stay on the device: reading one waits for the GPU, so they are read only now and then.
    # loss, score change, correct, seen
    sums = torch.tensor(sums or [0.0] * 4, dtype=torch.float64, device=device)
    saved = time.monotonic()
    todo = zip(loaded, batches[start:], shards[start:], strict=True)
    with progress_bar(desc=desc, total=sum(map(len, batches)), initial=sum(map(len, batches[:start]))) as bar:
        for step, ((x, y, *masks), batch, shard) in enumerate(todo, start=start):
            x, y = x.to(device, non_blocking=True), y.to(device)
            mask = masks[0].to(device, non_blocking=True) if masks else None
            if dataset.defer:  # augmented here, on the device, as the loader would have
                x, mask = dataset.augment_batch(x, mask, shard)
            optimizer.zero_grad(set_to_none=True)
            sums += _batch_gradients(network, x, y, mask, config=config, preprocess=preprocess, use_amp=use_amp,
                                     class_weight=class_weight)  # fmt: skip
            optimizer.step()
            if average is not None:
                average(step + 1)
            if config.schedule.name == "onecycle":
                schedule.step()
            bar.update(len(batch))
            if step % POSTFIX_EVERY == 0:  # the one read of the device in the loop
                loss_sum, change_sum, _, count = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / count:.4f}",
                                **({"change": f"{change_sum / count:.4f}"} if stable else {}))  # fmt: skip
            if save is None or step + 1 == len(batches):
                continue
            if stop is not None and stop.is_set():
                save(step + 1, sums.tolist())
                return sums.tolist(), step + 1
            if every_s > 0 and time.monotonic() - saved >= every_s:
                save(step + 1, sums.tolist())
                saved = time.monotonic()
    return sums.tolist(), None


def _average(averaged: ModelEmaV3, model: nn.Module, steps_before: int, step: int) -> None:
    """Fold ``model``'s weights into ``averaged`` after its epoch's ``step``-th optimiser step (from 1): the
    decay's warm-up counts the run's steps, ``steps_before`` of them in earlier epochs."""
    averaged.update(model, step=steps_before + step)


def _micro_batches(size: int, micro_batch: int) -> list[slice]:
    """The parts of a batch of ``size`` images run forward and backward one at a time (``micro_batch`` images
    each; 0: the whole batch at once)."""
    step = micro_batch or size
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


def _batch_gradients(
    network: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, **step: Any
) -> torch.Tensor:
    """Accumulate one batch's gradients, ``config.micro_batch`` images forward and backward at a time, each
    part's loss weighted by its share of the batch. Returns the batch's sums (see :func:`_backward`)."""
    parts = _micro_batches(len(y), step["config"].micro_batch)
    no_sync = getattr(network, "no_sync", None)  # DDP's (through torch.compile's wrapper too)
    sums = []
    for part in parts:  # DDP averages the gradients across processes once, after the batch's last part
        with nullcontext() if part is parts[-1] or no_sync is None else no_sync():
            sums.append(_backward(network, x[part], y[part], None if mask is None else mask[part],
                                  share=(part.stop - part.start) / len(y), **step))  # fmt: skip
    return torch.stack(sums).sum(0)


def _backward(
    network: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    share: float,
    config: TrainConfig,
    preprocess: PreprocessCfg,
    use_amp: bool,
    class_weight: torch.Tensor | None,
) -> torch.Tensor:
    """Run one (micro-)batch forward and its loss, scaled by its ``share`` of the batch, backward: the
    gradients accumulate until the optimiser steps. Returns its sums of loss, score change, correct verdicts
    and images (float64, on the device)."""
    stable = config.stability.weight > 0
    if stable:  # (B, 2, H, W): each image and its re-saved copy, scored in one batch of 2B
        x = torch.cat([x[:, :1], x[:, 1:]])
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        outputs = network(normalise(x, preprocess))
    if stable:
        outputs, copies = split_views(outputs, len(y))
    loss = task_loss(outputs, y, mask, class_weight=class_weight, map_weight=config.localise.map_weight,
                     box_weight=config.localise.box_weight, part_weight=config.fused.part_weight)  # fmt: skip
    change = torch.zeros((), device=x.device)
    if stable:
        change = stability_loss(outputs, copies, relative=config.stability.relative)
        loss = loss + config.stability.weight * change
    (loss * share).backward()
    correct = ((read_outputs(outputs)[0].detach() >= 0).long() == y).sum()
    count = torch.full((), len(y), device=x.device)
    return torch.stack([loss.detach() * len(y), change.detach() * len(y), correct, count]).double()


def _run_state(stateful: dict[str, Any], **run: Any) -> dict[str, Any]:
    """What a checkpoint to resume from holds: ``stateful``'s state dicts (model, optimiser, schedule) and
    the ``run``'s counters. One builder for ``last.pt`` and ``partial.pt``, so the two cannot drift apart."""
    return {**{name: part.state_dict() for name, part in stateful.items()}, **run}


def _save_within(
    path: Path, stateful: dict[str, Any], before: dict[str, Any], started: float, step: int, sums: list[float]
) -> None:
    """Save what ``last.pt`` holds (``stateful``'s state, and the run's history ``before`` this epoch) after
    ``step`` batches of the epoch, with their ``sums``, the random state and the epoch's seconds since
    ``started``: what resuming within the epoch needs."""
    within = {"step": step, "sums": sums, "random": _random_state(), "seconds": time.perf_counter() - started}
    save_checkpoint(path, _run_state(stateful, **before, **within))


def _random_state() -> dict:
    """The random state a training step draws from (dropout's): the CPU's and every GPU's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_random_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` for the training steps: as it is in one process, else in DDP (batch norm synchronised on
    GPUs; PyTorch synchronises it only there)."""
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def _batches(items: list[Draw], batch_size: int, ranks: Ranks) -> list[list[Draw]]:
    """The epoch's batches; each rank takes its :meth:`Ranks.shard`.

    They are those of one process; with several, a last batch smaller than the number of processes is left
    out (every rank must take part in every step): at most ``world - 1`` images an epoch.
    """
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return [batch for batch in batches if len(batch) >= ranks.world]


def initial_model(config: TrainConfig) -> tuple[nn.Module, dict]:
    """The network a run trains, as it starts, and what ``model.json`` needs beyond ``config.model`` to rebuild it.

    Without ``init_from``: a new ``config.model`` (ImageNet weights if ``pretrained``), or with
    ``fused.classifiers`` a new fused localiser of it and them, whose fusion weighs its parts alike. With
    ``init_from``: the source's weights. A fused localiser (a localiser and whole classifiers,
    :class:`fracdet.models.FusedLocaliser`) is trained whole, end to end: the losses then act on the fused image
    logit the model answers with, and its parts learn together what each alone did not (docs/STABILITY.md,
    *Why it flips*). Its fusion weights stay fixed while it trains and are fitted again on validation at the
    end, with its thresholds. ``antialias`` anti-aliases the network the run trains, a source's too (its weights
    load as they are); a source trained anti-aliased stays so.
    """
    options = build_options(vars(config))
    if config.fused.classifiers:
        from fracdet.models.ensemble import create_fused

        classifiers = config.fused.classifiers  # each named in the fusion by its architecture (and place, if twice)
        names = [n if classifiers.count(n) == 1 else f"{n} #{i}" for i, n in enumerate(classifiers, start=1)]
        parts = [{"model": model, "input_size": size, **options, "name": name} for model, size, name
                 in zip((config.model, *classifiers), config.fused.sizes, (config.model, *names),
                        strict=True)]  # fmt: skip
        return create_fused(parts, pretrained=config.pretrained).weigh_parts_alike(), {"fused": parts}
    if not config.init_from:
        return create_model(config.model, pretrained=config.pretrained, input_size=config.input_size, **options), {}
    from fracdet.models import load

    source = load(config.init_from)
    if source.arch != config.model:
        raise ValueError(f"init_from: {config.init_from} is a {source.arch}, the config trains a {config.model}")
    log.info("starting from the weights of %s %s", source.name, source.meta.get("version", ""))
    origin = source.label
    if not source.meta.get("fused"):
        if config.fused.part_weight:
            raise ValueError(f"fused.part_weight weighs the parts of a fused model, and {config.init_from} is not one")
        # the low-pass holds no weights, so the source's load into either network; one trained anti-aliased stays so
        options["antialias"] = config.antialias or build_options(source.meta)["antialias"]
        model = create_model(config.model, pretrained=False, input_size=config.input_size, **options)
        model.load_state_dict(source.network(f"start a training run (init_from: {config.init_from})").state_dict())
        return model, {"antialias": options["antialias"]}
    if config.antialias:  # every part of a fused source, as it describes them
        source = rebuilt(source, antialias=True)
    network = source.network(f"start a training run (init_from: {config.init_from})").float()
    if config.input_size != source.preprocess.input_size:
        raise ValueError(f"init_from: {config.init_from} is a fused model that reads {source.preprocess.input_size}"
                         f"-px images (its largest part's side): set image_size: {source.preprocess.input_size}, "
                         f"not {config.input_size}")  # fmt: skip
    if config.dropout is not None:
        raise ValueError(f"init_from: {config.init_from} is a fused model whose parts keep their own dropout: "
                         "leave dropout unset")  # fmt: skip
    return network, {"fused": source.meta["fused"], "members": source.meta.get("members", []), "init_from": origin}


def _label_conflicts(rows: pd.DataFrame) -> pd.DataFrame:
    """Training rows whose group holds both labels."""
    train = rows[rows["split"] == "train"]
    mixed = train.groupby("group")["label"].transform("nunique") > 1
    if mixed.any():
        log.warning("leaving out %d training files in %d groups that carry both labels", mixed.sum(),
                    train.loc[mixed, "group"].nunique())  # fmt: skip
    return train[mixed]


def _annotations(table: pd.DataFrame, split: str) -> list[tuple[list, list]]:
    """Per image of ``split``, its expert ``(boxes, polygons)``: a localiser's training targets."""
    if "boxes" not in table:
        raise ValueError("a localiser learns from expert boxes: this dataset has none (FracAtlas has them)")
    rows = table[table["split"] == split]
    polygons = rows["polygons"] if "polygons" in rows else [[]] * len(rows)
    return [(b if isinstance(b, list) else [], p if isinstance(p, list) else [])
            for b, p in zip(rows["boxes"], polygons, strict=True)]  # fmt: skip


def _subset(pixels: PixelSet, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images and labels; the images a view of ``pixels.images`` when the split's rows are
    contiguous (as :func:`train` orders them), else a copy."""
    rows = np.flatnonzero((pixels.table["split"] == split).to_numpy())
    contiguous = len(rows) > 0 and rows[-1] - rows[0] + 1 == len(rows)
    images = pixels.images[rows[0] : rows[-1] + 1] if contiguous else pixels.images[rows]
    return images, pixels.table["label"].to_numpy(np.int64)[rows]


def _export(
    model: nn.Module,
    config: TrainConfig,
    preprocess: PreprocessCfg,
    val: tuple[np.ndarray, np.ndarray],
    out_dir: Path,
    best_state: dict,
    device: torch.device,
    val_boxes: list | None = None,
    composition: dict | None = None,
) -> None:
    """Write the best weights with what was fitted on validation: a fused model's fusion, the temperature and
    the operating thresholds. ``composition``: how a fused model is made up (:func:`initial_model`)."""
    meta = {"model": config.model, **build_options(vars(config)), "epoch": int(best_state["epoch"]),
            "selected_on": config.select_on, "monitor": config.monitor, **(composition or {})}  # fmt: skip
    trained = TrainedModel(module=model, name=out_dir.name, arch=config.model, preprocess=preprocess, meta=meta)
    calibrate(trained, *val, batch_size=2 * config.batch_size, device=device, boxes=val_boxes, progress=True)
    save_model(trained, out_dir)


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a run folder made by `fracdet train`?")
    return yaml.safe_load(path.read_text()) or {}
