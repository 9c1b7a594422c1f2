"""Typed training configuration, loadable from YAML.

A config names every choice that changes a result, so a run folder's ``config.yaml`` is enough to
repeat the run. Unknown keys are errors (a typo must not silently fall back to a default), and values
are checked when the config is built, before any image is decoded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

import yaml

from fracdet.utils.atomic import atomic_write_text

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "FusedConfig",
    "LocaliseConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "StabilityConfig",
    "TrainConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names the key."""


@dataclass
class OptimizerConfig:
    """Optimiser and its hyper-parameters (the paper: Adam, learning rate 0.001)."""

    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only

    def check(self) -> None:
        _one_of("optimizer.name", self.name, ("adam", "adamw", "sgd"))
        _positive("optimizer.lr", self.lr)
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay must be 0 or more, not {self.weight_decay!r}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped once per epoch (one-cycle: once per batch)."""

    name: str = "none"  # none | step | cosine | onecycle | plateau
    warmup_epochs: int = 0  # linear warm-up before cosine / step
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.1  # step and plateau: decay factor
    patience: int = 3  # plateau: epochs without improvement of the monitored metric
    min_lr: float = 0.0

    def check(self) -> None:
        _one_of("schedule.name", self.name, ("none", "step", "cosine", "onecycle", "plateau"))


@dataclass
class AugmentConfig:
    """Training-time augmentation (the paper: flip, rotate, scale). Zero switches a transform off."""

    hflip: float = 0.0  # probability of a horizontal flip
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    scale: float = 0.0  # relative, uniform in [1 - scale, 1 + scale]
    translate: float = 0.0  # fraction of the side
    contrast: float = 0.0  # relative jitter of contrast and brightness
    reencode: float = 0.0  # probability of a JPEG or WebP round trip at a random quality (30-95)
    rescale: float = 0.0  # relative: shrink the side by up to this and enlarge back (lost resolution)

    def enabled(self) -> bool:
        return any(v > 0 for v in asdict(self).values())

    def check(self) -> None:
        """Probabilities within [0, 1]; ranges that keep an image an image (``1 - scale`` above zero)."""
        bounds = {"hflip": 1.0, "reencode": 1.0, "rotation": 360.0, "translate": 1.0, "scale": 0.99,
                  "contrast": 0.99, "rescale": 0.99}  # fmt: skip
        for name, most in bounds.items():
            value = getattr(self, name)
            if not 0 <= value <= most:  # NaN fails too
                raise ConfigError(f"augment.{name} must be 0 to {most:g}, not {value!r}")


@dataclass
class LocaliseConfig:
    """How a localiser (``task: localise`` in the registry) learns where: ignored by classifiers.

    Attributes:
        target: masks are drawn from the expert ``box``es or their ``polygon``s.
        map_weight: weight of the dense map loss (focal loss per cell) beside the image-level loss.
        box_weight: weight of a box head's loss (generalised IoU per fracture cell; detectors only).
    """

    target: str = "box"
    map_weight: float = 1.0
    box_weight: float = 1.0

    def check(self) -> None:
        from fracdet.data.masks import MASK_TARGETS

        _one_of("localise.target", self.target, MASK_TARGETS)
        for name in ("map_weight", "box_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"localise.{name} must not be negative, not {getattr(self, name)!r}")


#: The formats a re-encoding round trip may save in (``fracdet.training.augment.Reencode``).
RESAVE_CODECS = ("jpeg", "webp")


@dataclass
class StabilityConfig:
    """Stability training (Zheng et al. 2016): the same verdict for a radiograph and a re-saved copy of it.

    Re-encoding augmentation alone teaches a model that re-saved images are fractured or not as often as
    the originals, not that each keeps its own score: localisers trained with it still changed their verdict
    for 5-8% of validation images re-saved as JPEG q75 (``docs/RESULTS.md``, section 6). With a weight, every
    training image is scored twice, as augmented and as a copy shrunk by up to ``rescale`` and round-tripped
    through JPEG or WebP at a random quality, and the change of its scores (the image logit, and a
    localiser's map peak) joins the loss (its Huber loss: squared up to a logit, linear beyond).

    Attributes:
        weight: weight of the score change beside the task loss (0: off; on, each step scores
            twice as many images).
        rescale: the copy's side shrinks by a factor drawn from ``[1 - rescale, 1]`` before the round trip.
        relative: measure the change against the spread of the batch's scores, not in logits (see
            :func:`fracdet.training.losses.stability_loss`).
        shift: also move the copy by up to this many whole pixels along each axis (0: never), so that the
            score must hold at every phase of the network's sampling grids: the released model's verdict
            flipped as often for a radiograph moved by one pixel as for one re-saved (docs/STABILITY.md).
        codecs: the formats the copy's round trip saves in, one drawn per image (``jpeg``, ``webp``); ``[]``:
            none, the copy is only shrunk and enlarged back, so the loss asks for steadiness against the
            smaller copy alone (where leaving the loss out cost most: docs/STABILITY.md, measurement 12).
    """

    weight: float = 0.0
    rescale: float = 0.5
    relative: bool = False
    shift: int = 0
    codecs: list[str] = field(default_factory=lambda: list(RESAVE_CODECS))

    def check(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"stability.weight must not be negative, not {self.weight!r}")
        if not 0 <= self.rescale < 1:
            raise ConfigError(f"stability.rescale must be in [0, 1), not {self.rescale!r}")
        if self.shift < 0:
            raise ConfigError(f"stability.shift must not be negative, not {self.shift!r}")
        for codec in self.codecs:
            _one_of("stability.codecs", codec, RESAVE_CODECS)
        if len(set(self.codecs)) < len(self.codecs):
            raise ConfigError(f"stability.codecs names a codec twice: {self.codecs!r}")
        if self.weight > 0 and not (self.codecs or self.rescale or self.shift):
            raise ConfigError("stability: with no codecs, no rescale and no shift the copy is the image itself; "
                              "give stability.rescale or stability.shift, or a codec")  # fmt: skip


@dataclass
class FusedConfig:
    """A fused localiser trained as one from ImageNet weights (:class:`fracdet.models.FusedLocaliser`): the
    localiser ``model`` (its map, boxes and classifier head) and whole classifiers whose margins join its
    image logit, each reading the image at its own side.

    Fused after training (``fracdet ensemble``), each part had learned alone, and trained against re-saving
    alone, none stopped the fused verdict from flipping (docs/STABILITY.md, *Why it flips*). Trained as
    one, the task and stability losses act on the fused score from the first epoch. While it trains the
    fusion weighs every part alike (the classifier head, the map's peak and each classifier's margin), so
    every part gets a gradient; at the end it is fitted on validation, with the thresholds.

    Attributes:
        classifiers: registry names of the classifiers (empty: a single network, or ``init_from``'s parts).
        sizes: the input side of the localiser, then of each classifier; the run reads images at the
            largest (``image_size``, if set, must be that).
        part_weight: weight of each part's own image loss (its logit against the label) beside the fused
            one, so that each stays a ranker on its own (deep supervision); also for a fused ``init_from``.
            0: the parts learn only through the fused score.
    """

    classifiers: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    part_weight: float = 0.0

    def check(self, config: TrainConfig) -> None:
        from fracdet.models import get_spec

        if self.part_weight < 0:
            raise ConfigError(f"fused.part_weight must not be negative, not {self.part_weight!r}")
        if not self.classifiers:
            if self.sizes:
                raise ConfigError("fused.sizes needs fused.classifiers: the sizes are those of the fused parts")
            if self.part_weight and not config.init_from:
                raise ConfigError("fused.part_weight weighs the parts of a fused model: name fused.classifiers "
                                  "or a fused init_from")  # fmt: skip
            return
        if config.init_from:
            raise ConfigError("fused.classifiers builds a fused model from ImageNet weights; init_from starts from "
                              "a saved one (which may be fused already): set one of them")  # fmt: skip
        localiser = get_spec(config.model)
        if localiser.task != "localise":
            raise ConfigError(f"a fused model's model is its localiser, and {config.model} is not one")
        ours = localiser.preprocess
        for name in self.classifiers:
            try:
                spec = get_spec(name)
            except KeyError as exc:
                raise ConfigError(f"fused.classifiers: {exc.args[0]}") from None
            if spec.task != "classify":
                raise ConfigError(f"fused.classifiers: {name} is not a classifier")
            if (spec.preprocess.mean, spec.preprocess.std) != (ours.mean, ours.std):
                raise ConfigError(f"fused.classifiers: {name} normalises its input otherwise than {config.model}")
        if len(self.sizes) != len(self.classifiers) + 1:
            raise ConfigError(f"fused.sizes must hold {len(self.classifiers) + 1} sides (the localiser's, then each "
                              f"classifier's), not {self.sizes!r}")  # fmt: skip
        for size in self.sizes:
            _positive("fused.sizes", size)
        if self.sizes[0] % 32:
            raise ConfigError(f"a localiser's side must be a multiple of 32, not fused.sizes[0] = {self.sizes[0]}")
        if config.image_size is not None and config.image_size != max(self.sizes):
            raise ConfigError(f"a fused model reads images at its largest part's side: image_size must be "
                              f"{max(self.sizes)} (or unset), not {config.image_size}")  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on besides the data.

    Attributes:
        model: registry name (``fracdet.models.list_models()``).
        pretrained: start from ImageNet weights.
        image_size: input side in pixels; ``None`` uses the model's registered size.
        dropout: dropout before the classifier; ``None`` keeps the architecture's default.
        antialias: a low-pass before each subsampling of an EfficientNet-Lite backbone, every part's in a
            fused model (:mod:`fracdet.models.backbones`): steadier scores when a radiograph moves by a
            fraction of a pixel or is re-saved, without blurring the input.
        epochs: upper bound; early stopping may end sooner.
        batch_size: images per optimiser step.
        micro_batch: run each batch forward and backward in parts of this many images, their gradients
            summed before the step (0: the whole batch at once): a batch that does not fit in memory (the
            fused recipe's 32 at 320 px, each with its re-saved copy, on a CPU) trained in less. The step
            is the whole batch's except for batch-norm statistics, taken per part, and for losses
            normalised over the batch rather than per image (class-weighted means, the map loss's fracture
            cells), which become the parts' means weighted by their sizes.
        ema: decay of a moving average of the weights (and batch-norm statistics), folded in after every
            optimiser step (timm's ``ModelEmaV3``); the decay is warmed up, ``1 - n ** -0.75`` after the
            run's ``n``-th step until it reaches ``ema``, so the first epochs are not held to the initial
            weights. Above 0 the average, not the last step's weights, is what every epoch validates and
            what the run selects and exports: an ensemble of the run's own recent steps at no extra
            training step, which tends to rank better and to vary less between seeds (docs/STABILITY.md,
            measurement 13). 0: off.
        monitor: validation metric that picks the best checkpoint and drives early stopping and the
            plateau schedule: ``auc`` (default), ``accuracy`` or ``loss``.
        early_stopping: stop after this many epochs without improvement (0: never).
        balance: class imbalance: ``none``, ``class_weights`` (weighted loss), ``sampler`` (weighted
            sampling) or ``undersample`` (a fresh balanced subset of the majority class each epoch).
        drop_label_conflicts: leave out training files whose group (copies of one radiograph, see
            ``fracdet split``) carries both labels: one picture cannot teach both answers.
        amp: mixed precision (bfloat16) on a GPU; ignored on the CPU.
        compile: run the training steps through ``torch.compile`` (faster steps after a compilation of a
            minute or so; worth it for long runs on a GPU).
        seed: seeds weights, sampling and augmentation; resumed runs continue the same streams.
        deterministic: ask PyTorch for deterministic kernels (slower on a GPU).
        select_on: split whose metric picks the best checkpoint. ``val`` always, except to reproduce the
            paper's selection on the test split (``test``), which every report marks as not honest.
        workers: data-loading processes (0: in the training process).
        checkpoint_minutes: within an epoch, the training state is also saved this often (0: only at the
            epochs' ends), so a run killed midway through a long epoch (an hour at full size on two CPU
            cores) resumes from the last of these, to the same weights, instead of from the epoch's start.
            One training process only; a distributed run saves at the epochs' ends.
        augment_on: where the augmentation runs: ``loader`` (in the data-loading processes) or ``device``
            (on the training device, batch by batch: a GPU's time instead of the CPU cores'; the same
            transforms and random numbers, so the same batches).
        localise: masks and loss weight of a localiser.
        stability: stability training against re-encoding and rescaling (off by default).
        init_from: a model folder or release name whose weights the run starts from instead of ImageNet's
            (fine-tuning, e.g. a released model with stability training); it must be a ``model``. A fused
            localiser (``fracdet ensemble`` of a localiser and classifiers) is trained whole, at its own
            ``image_size``, its fusion refitted on validation at the end.
        fused: a fused localiser trained as one from ImageNet weights (:class:`FusedConfig`).
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``.
    """

    model: str = "paper_cnn"
    pretrained: bool = False
    image_size: int | None = None
    dropout: float | None = None
    antialias: bool = False
    epochs: int = 49
    batch_size: int = 32
    micro_batch: int = 0
    ema: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    monitor: str = "auc"
    early_stopping: int = 0
    balance: str = "none"
    drop_label_conflicts: bool = True
    amp: bool = True
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    select_on: str = "val"
    workers: int = 0
    checkpoint_minutes: float = 10.0
    augment_on: str = "loader"
    device: str = "auto"
    localise: LocaliseConfig = field(default_factory=LocaliseConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    init_from: str | None = None
    fused: FusedConfig = field(default_factory=FusedConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        from fracdet.models import get_spec

        try:
            get_spec(self.model)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if self.pretrained and self.model == "paper_cnn":
            raise ConfigError("paper_cnn is trained from scratch: set pretrained: false")
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        if not 0 <= self.micro_batch <= self.batch_size:
            raise ConfigError(f"micro_batch must be 0 (the whole batch) to batch_size ({self.batch_size}), "
                              f"not {self.micro_batch}")  # fmt: skip
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be 0 (off) or a decay below 1, such as 0.998, not {self.ema!r}")
        for name in ("checkpoint_minutes", "early_stopping", "workers"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be 0 (off) or more, not {getattr(self, name)!r}")
        if self.image_size is not None:
            _positive("image_size", self.image_size)
        _one_of("monitor", self.monitor, ("auc", "accuracy", "loss"))
        _one_of("balance", self.balance, ("none", "class_weights", "sampler", "undersample"))
        _one_of("select_on", self.select_on, ("val", "test"))
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("augment_on", self.augment_on, ("loader", "device"))
        self.optimizer.check()
        self.augment.check()
        self.schedule.check()
        self.localise.check()
        self.stability.check()
        self.fused.check(self)
        if get_spec(self.model).task == "localise" and self.input_size % 32:
            raise ConfigError(f"a localiser's image_size must be a multiple of 32, not {self.input_size}")

    @property
    def input_size(self) -> int:
        from fracdet.models import get_spec

        if self.fused.classifiers:
            return max(self.fused.sizes)
        return self.image_size or get_spec(self.model).preprocess.input_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "")

    #: Keys that change how a run computes and not what it learns (augmentation is seeded per image and epoch,
    #: not per loading process), so a run may resume with others: fewer loading processes on a machine with
    #: less memory than the one it started on, checkpoints more or less often within an epoch.
    RESUMABLE_KEYS: ClassVar[frozenset[str]] = frozenset({"workers", "checkpoint_minutes"})

    def differences(self, other: TrainConfig) -> list[str]:
        """The dotted keys whose values differ between this config and ``other``, in config order."""
        ours, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [key for key in ours if ours[key] != theirs[key]]

    def resumed_with(self, other: TrainConfig) -> TrainConfig:
        """This (saved) run's config, continued as ``other`` asks.

        A resumed run must reach the weights an uninterrupted one would, so ``other`` may change only
        :attr:`RESUMABLE_KEYS`; anything else is refused with the keys named, never silently ignored.
        """
        changed = [key for key in self.differences(other) if key not in self.RESUMABLE_KEYS]
        if changed:
            free = ", ".join(sorted(self.RESUMABLE_KEYS))
            raise ConfigError(f"the config differs from the run's in {', '.join(changed)}: a run resumes with what "
                              f"it learns unchanged; only {free} may change")  # fmt: skip
        return dataclasses.replace(self, **{key: getattr(other, key) for key in self.RESUMABLE_KEYS})

    def with_overrides(self, overrides: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings (dotted keys, YAML values), e.g. ``optimizer.lr=3e-4``."""
        data = self.to_dict()
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not key=value")
            node = data
            *parents, leaf = key.strip().split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"unknown config key {key!r}")
                node = node[part]
            if leaf not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node[leaf] = yaml.safe_load(raw)
        return TrainConfig.from_dict(data)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (missing keys take their defaults) and apply ``key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    try:
        config = TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config.with_overrides(overrides or [])


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(kind, value, prefix + name)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def _coerce(kind: Any, value: Any, key: str) -> Any:
    """Check a value against its annotation; ints and numeric strings are accepted where floats are expected,
    and a list's items are checked one by one."""
    if get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, not {value!r}")
        (item,) = get_args(kind)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    allowed = getattr(kind, "__args__", (kind,))
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be empty")
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool) and isinstance(value, t):
            return value
    names = "/".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{key} must be {names}, not {value!r}")


def _one_of(key: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}, not {value!r}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be positive, not {value!r}")
