"""Training on several processes (torchrun, DDP over gloo on the CPU) is training on one, shared out.

Exactness needs a network whose training step does not depend on how a batch is cut: batch norm
normalises over each process's part of a batch (PyTorch synchronises it only on GPUs), so the reference
network here has none. With it, two processes reach the weights of one within float rounding, and a run
started on two processes resumes on one. The shipped recipes (batch norm) are checked through the command
line: they train, write one run folder, and resume on another device count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fracdet.cli import main
from fracdet.data import load_dataset
from fracdet.models import register_model
from fracdet.models._registry import PreprocessCfg
from fracdet.training import load_config, train
from fracdet.training.distributed import Ranks
from fracdet.utils.cache import FeatureCache

REPO = Path(__file__).resolve().parents[1]
PLAIN = "plain_cnn_test"


class PlainCNN(nn.Module):
    """Convolutions, ReLU, pooling and a linear head; no batch norm, no dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.features(x)
        return self.head(features.mean(dim=(2, 3))), [features]


def register_plain() -> None:
    from fracdet.models._registry import _REGISTRY

    if PLAIN not in _REGISTRY:
        register_model(PLAIN, preprocess=PreprocessCfg(32), cam_layer="features.4", description="tests only")(
            lambda pretrained, num_classes, **_: PlainCNN()
        )


def manifest(sample_root: Path) -> pd.DataFrame:
    """The bundled sample: 24 readable training images (3 batches of 8, 4 per process), the rest validation;
    both classes on each side."""
    table = load_dataset(sample_root)
    candidate = ~table["path"].str.contains("IMG0004028") & (np.arange(len(table)) % 3 != 0)  # truncated file out
    split = np.where(candidate & (candidate.cumsum() <= 24), "train", "val")
    out = table.assign(split=split)
    out.attrs.update(table.attrs)
    return out


def plain_config(epochs: int = 2, micro_batch: int = 0, ema: float = 0.0):
    overrides = [f"model={PLAIN}", "image_size=32", "batch_size=8", "optimizer.lr=0.003", "dropout=0",
                 f"epochs={epochs}", "augment.hflip=0.5", "augment.rotation=10", "augment.contrast=0.2",
                 f"micro_batch={micro_batch}", f"ema={ema}"]  # fmt: skip
    return load_config(REPO / "configs" / "paper.yaml", overrides)


SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_distributed import manifest, plain_config, register_plain
from fracdet.training import train
from fracdet.training.augment import AugmentedImages
from fracdet.training.distributed import process_group
from fracdet.utils.cache import FeatureCache

fetched = []
item = AugmentedImages.__getitem__
AugmentedImages.__getitem__ = lambda self, key: fetched.append(key) or item(self, key)
register_plain()
with process_group() as ranks:
    train(plain_config(micro_batch={micro_batch!r}, ema={ema!r}), manifest(Path({sample!r})), Path({run!r}),
          cache=FeatureCache({cache!r}), stop_after={stop_after!r}, ranks=ranks)
    Path({run!r}, f"fetched-{{ranks.rank}}.txt").write_text(str(len(fetched)))
"""


def torchrun(
    tmp_path: Path,
    run: Path,
    sample_root: Path,
    cache_dir: Path,
    stop_after: int | None = None,
    micro_batch: int = 0,
    ema: float = 0.0,
) -> None:
    script = tmp_path / f"train_{run.name}.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), sample=str(sample_root), run=str(run),
                                    cache=str(cache_dir), stop_after=stop_after, micro_batch=micro_batch,
                                    ema=ema))  # fmt: skip
    env = {**os.environ, "FRACDET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    str(script)], check=True, env=env, timeout=300)  # fmt: skip


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


def test_each_process_takes_its_share_of_every_batch_and_together_they_take_it_all():
    batch = [(position, 100 + position) for position in range(8)]
    shares = [Ranks(rank, 3).shard(batch) for rank in range(3)]
    assert sorted(item for share in shares for item in share) == batch
    assert [len(share) for share in shares] == [3, 3, 2]


def test_an_image_is_augmented_the_same_whoever_scores_it():
    from fracdet.training.augment import AugmentedImages, Draw, build_augmentation
    from fracdet.training.config import AugmentConfig

    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    augment = build_augmentation(AugmentConfig(hflip=0.5, rotation=20, contrast=0.3))
    dataset = AugmentedImages(images, np.zeros(4), augment, seed=3)
    first = dataset[Draw(epoch=2, position=5, index=1)][0]
    torch.manual_seed(123)  # whatever was drawn before
    dataset[Draw(2, 6, 2)]
    assert torch.equal(dataset[Draw(2, 5, 1)][0], first)
    assert not torch.equal(dataset[Draw(2, 7, 1)][0], first)  # another position, another augmentation
    assert not torch.equal(dataset[Draw(3, 5, 1)][0], first)  # another epoch, another augmentation


@pytest.mark.parametrize("ema", [0.0, 0.5], ids=["last-step", "moving-average"])
def test_two_processes_train_the_same_weights_as_one(sample_root, cache_dir, tmp_path, ema):
    register_plain()
    cache = FeatureCache(cache_dir)
    one = train(plain_config(ema=ema), manifest(sample_root), tmp_path / "one", cache=cache)
    # each process's 4 images of a batch in micro-batches of 2: gradients averaged across them once a batch
    torchrun(tmp_path, tmp_path / "two", sample_root, cache_dir, micro_batch=2, ema=ema)
    two = pd.read_csv(tmp_path / "two" / "metrics.csv")
    assert np.isfinite(two["val_auc"]).all()
    for column in ("train_loss", "train_accuracy", "val_loss", "val_auc"):
        np.testing.assert_allclose(two[column], one.history[column], rtol=1e-4, err_msg=column)
    single, double = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in single:
        np.testing.assert_allclose(double[name], single[name], atol=2e-5, err_msg=name)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    for rank in (0, 1):  # each process augmented and trained on half the images of each epoch
        assert (tmp_path / "two" / f"fetched-{rank}.txt").read_text() == str(2 * 24 // 2)


def test_a_run_begun_on_two_processes_resumes_on_one(sample_root, cache_dir, tmp_path):
    register_plain()
    cache = FeatureCache(cache_dir)
    train(plain_config(), manifest(sample_root), tmp_path / "one", cache=cache)
    torchrun(tmp_path, tmp_path / "moved", sample_root, cache_dir, stop_after=1)
    assert not (tmp_path / "moved" / "model.json").exists()
    assert len(pd.read_csv(tmp_path / "moved" / "metrics.csv")) == 1
    result = train(None, manifest(sample_root), tmp_path / "moved", resume=True, cache=cache)
    assert list(result.history["epoch"]) == [1, 2]
    single, moved = weights(tmp_path / "one"), weights(tmp_path / "moved")
    for name in single:
        np.testing.assert_allclose(moved[name], single[name], atol=2e-5, err_msg=name)


def test_train_devices_2_starts_the_processes_and_a_sitting_resumes_on_one(sample_root, tmp_path, monkeypatch):
    """The shipped paper recipe (batch norm) through the command line: one run folder, resumable anywhere."""
    monkeypatch.setenv("FRACDET_PROGRESS", "0")
    splits = tmp_path / "splits.csv"
    manifest(sample_root)[["path", "label", "group", "split"]].to_csv(splits, index=False)
    run = tmp_path / "paper"
    common = ["--data", str(sample_root), "--out", str(run)]
    args = ["train", "--config", str(REPO / "configs" / "paper.yaml"), "--splits", str(splits), *common,
            "--set", "image_size=32", "--set", "batch_size=8", "--set", "epochs=2"]  # fmt: skip
    assert main([*args, "--devices", "2", "--stop-after", "1"]) == 0
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == [1] and np.isfinite(history["val_auc"]).all()
    assert json.loads((run / "run.json").read_text())["processes"] == 2
    assert main(["train", "--resume", *common]) == 0
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]
    assert (run / "model.json").is_file()


def test_several_machines_need_a_rendezvous(sample_root, tmp_path):
    with pytest.raises(SystemExit, match="rendezvous"):
        main(["train", "--config", str(REPO / "configs" / "paper.yaml"), "--data", str(sample_root),
              "--out", str(tmp_path / "r"), "--nodes", "2"])  # fmt: skip
