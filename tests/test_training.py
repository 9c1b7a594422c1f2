"""Training: typed configs, the run folder, checkpoints, and exact resume after an interruption."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fracdet.data import load_dataset
from fracdet.models import load
from fracdet.training import ConfigError, RunExistsError, TrainConfig, load_config, train, trainer
from fracdet.training.augment import epoch_indices
from fracdet.training.checkpoint import load_checkpoint, save_checkpoint
from fracdet.training.stopping import StopRequest
from fracdet.utils.cache import FeatureCache

REPO = Path(__file__).resolve().parents[1]
TINY = ["image_size=32", "batch_size=8", "optimizer.lr=0.01"]


def sample_manifest(sample_root: Path) -> pd.DataFrame:
    """The bundled sample with every third file in validation and the rest in training."""
    table = load_dataset(sample_root)
    split = np.where(np.arange(len(table)) % 3 == 0, "val", "train")
    out = table.assign(split=split)
    out.attrs.update(table.attrs)
    return out


def tiny_config(**overrides) -> TrainConfig:
    config = load_config(REPO / "configs" / "paper.yaml", [*TINY, "epochs=3"])
    return config.with_overrides([f"{k}={v}" for k, v in overrides.items()])


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["paper", "default", "default-gpu", "localiser", "stability", "stability-fused", "fused-gpu"]
)
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.input_size > 0


def test_paper_config_states_the_papers_settings():
    config = load_config(REPO / "configs" / "paper.yaml")
    assert (config.model, config.input_size, config.optimizer.name) == ("paper_cnn", 150, "adam")
    assert (config.optimizer.lr, config.batch_size, config.epochs) == (0.001, 32, 49)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: paper_cnn\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    bad.write_text("optimizer: {name: rmsprop}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.name"):
        load_config(bad)
    bad.write_text("epochs: ten\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown model"):
        TrainConfig(model="no_such_net")
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig().with_overrides(["epochs"])
    with pytest.raises(ConfigError, match="micro_batch"):
        TrainConfig(batch_size=16, micro_batch=32)
    wrong = [("early_stopping=-1", "early_stopping must be 0"), ("workers=-3", "workers must be 0"),
             ("optimizer.weight_decay=-0.1", "weight_decay"), ("augment.hflip=2", "augment.hflip"),
             ("augment.scale=1.5", "augment.scale"), ("augment.rotation=nan", "augment.rotation")]  # fmt: skip
    for override, words in wrong:
        with pytest.raises(ConfigError, match=re.escape(words)):
            TrainConfig().with_overrides([override])


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: {lr: 1e-4}\n")  # YAML 1.1 reads this as a string
    assert load_config(path).optimizer.lr == 0.0001


def test_config_round_trips_through_yaml(tmp_path):
    config = tiny_config(**{"schedule.name": "cosine", "augment.hflip": 0.5})
    again = load_config(config.save(tmp_path / "c.yaml"))
    assert again == config


# --- sampling -------------------------------------------------------------------------------------


def test_epoch_sampling_balances_classes_and_is_reproducible():
    labels = np.array([0] * 90 + [1] * 10)
    under = epoch_indices(labels, "undersample", seed=0, epoch=3)
    assert np.bincount(labels[under]).tolist() == [10, 10]
    drawn = epoch_indices(labels, "sampler", seed=0, epoch=3)
    assert 0.35 < labels[drawn].mean() < 0.65
    assert np.array_equal(drawn, epoch_indices(labels, "sampler", seed=0, epoch=3))
    assert not np.array_equal(drawn, epoch_indices(labels, "sampler", seed=0, epoch=4))
    assert sorted(epoch_indices(labels, "none", seed=0, epoch=0)) == list(range(100))


# --- the run folder -----------------------------------------------------------------------------


def test_training_writes_a_traceable_run_folder(sample_root, cache_dir, tmp_path):
    manifest = sample_manifest(sample_root)
    result = train(tiny_config(), manifest, tmp_path / "run", cache=FeatureCache(cache_dir))
    run = result.out_dir
    for name in ("config.yaml", "splits.csv", "run.json", "metrics.csv", "curves.png", "model.safetensors",
                 "model.json", "checkpoints/last.pt", "checkpoints/best.pt"):  # fmt: skip
        assert (run / name).is_file(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert {"train_loss", "val_loss", "val_accuracy", "val_auc", "lr", "seconds"} <= set(metrics.columns)
    assert result.best_epoch == int(metrics.loc[metrics["best"], "epoch"].iloc[-1])
    # the truncated sample file is left out and listed, not fatal
    import json

    info = json.loads((run / "run.json").read_text())
    assert any("IMG0004028" in s["path"] for s in info["skipped"])
    model = json.loads((run / "model.json").read_text())
    assert set(model["thresholds"]) == {"0.5", "youden", "sens90", "sens95", "spec95"}
    assert model["temperature"] > 0
    with pytest.raises(RunExistsError):
        train(tiny_config(), manifest, run, cache=FeatureCache(cache_dir))


def test_training_leaves_out_copy_groups_that_carry_both_labels(sample_root, cache_dir, tmp_path):
    import json

    manifest = sample_manifest(sample_root)
    train_rows = manifest.index[manifest["split"] == "train"]
    fractured = train_rows[manifest.loc[train_rows, "label"] == 1][0]
    intact = train_rows[manifest.loc[train_rows, "label"] == 0][0]
    manifest.loc[[fractured, intact], "group"] = "one picture, two labels"
    run = train(tiny_config(epochs=1), manifest, tmp_path / "run", cache=FeatureCache(cache_dir)).out_dir
    info = json.loads((run / "run.json").read_text())
    assert sorted(info["dropped_label_conflicts"]) == sorted(manifest.loc[[fractured, intact], "path"])
    unreadable = {s["path"] for s in info["skipped"]} & set(manifest.loc[train_rows, "path"])
    assert info["images"]["train"] == len(train_rows) - 2 - len(unreadable)


def test_training_needs_train_and_val_rows(sample_root, tmp_path):
    manifest = sample_manifest(sample_root).assign(split="train")
    with pytest.raises(ValueError, match="'train' and 'val'"):
        train(tiny_config(), manifest, tmp_path / "run")


@pytest.mark.parametrize(
    ("schedule", "balance"), [("step", "class_weights"), ("onecycle", "sampler"), ("plateau", "undersample")]
)
def test_schedules_and_balancing_train(sample_root, cache_dir, tmp_path, schedule, balance):
    config = tiny_config(**{"schedule.name": schedule, "balance": balance, "epochs": 2, "augment.rotation": 10,
                            "augment.hflip": 0.5, "augment.contrast": 0.2, "optimizer.name": "sgd"})  # fmt: skip
    result = train(config, sample_manifest(sample_root), tmp_path / "run", cache=FeatureCache(cache_dir))
    assert len(result.history) == 2
    assert np.isfinite(result.history["train_loss"]).all()


def test_early_stopping_ends_the_run(sample_root, cache_dir, tmp_path):
    config = tiny_config(epochs=30, early_stopping=2, **{"optimizer.lr": 1e-9})  # nothing can improve
    result = train(config, sample_manifest(sample_root), tmp_path / "run", cache=FeatureCache(cache_dir))
    assert result.stopped_early
    assert len(result.history) < 30


# --- interruption and resume --------------------------------------------------------------------


class SimulatedCrashError(Exception):
    pass


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_resume_after_interruption_reaches_the_same_weights(sample_root, cache_dir, tmp_path, caplog):
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    config = tiny_config(epochs=4, **{"augment.hflip": 0.5, "augment.rotation": 10, "balance": "sampler"})
    train(config, manifest, tmp_path / "straight", cache=cache)

    def stop_after_second(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise SimulatedCrashError

    with pytest.raises(SimulatedCrashError) as crash:  # made on 2 loading processes, straight on none
        train(config.with_overrides(["workers=2"]), manifest, tmp_path / "broken", cache=cache,
              on_epoch_end=stop_after_second)  # fmt: skip
    assert not (tmp_path / "broken" / "model.json").exists()
    # the crash stopped them, even while its traceback (which holds the loader) is still at hand
    assert crash.traceback and not multiprocessing.active_children()
    # resumed on a machine with less memory: another number of loading processes, the same weights
    elsewhere = config.with_overrides(["workers=1"])
    with caplog.at_level(logging.INFO, logger="fracdet.training.trainer"):
        result = train(elsewhere, manifest, tmp_path / "broken", resume=True, cache=cache)
    assert "after epoch 2" in caplog.text  # the two that finished, counted as the history counts them
    assert list(result.history["epoch"]) == [1, 2, 3, 4]
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "broken")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match=r"config differs from the run's in epochs, optimizer\.lr"):
        train(config.with_overrides(["epochs=5", "optimizer.lr=0.5"]), manifest, tmp_path / "broken", resume=True,
              cache=cache)  # fmt: skip


def test_a_moving_average_of_the_weights_is_what_a_run_validates_selects_exports_and_resumes_to(
    sample_root, cache_dir, tmp_path, monkeypatch
):
    # With `ema` the run's model is the average of its recent steps, not its last step's weights: every epoch
    # scores it, the best epoch keeps it, the export ships it, and a run stopped anywhere resumes to it.
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    config = tiny_config(ema=0.9, dropout=0.5, **{"augment.hflip": 0.5})
    averages, scored, validated = [], [], []

    def keep_the_average(epoch: int, row: dict) -> None:  # after the epoch's validation and checkpoint
        averages.append(load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["ema"])
        validated.append(scored[-1])

    margins, step, steps = trainer.predict_margins, trainer._batch_gradients, []

    def note_what_is_scored(model, *args, **kwargs):
        scored.append({k: v.clone() for k, v in model.state_dict().items()})
        return margins(model, *args, **kwargs)

    def count_the_steps(*args, **kwargs):
        steps.append(1)
        return step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "predict_margins", note_what_is_scored)
        patch.setattr(trainer, "_batch_gradients", count_the_steps)
        result = train(config, manifest, tmp_path / "straight", cache=cache, on_epoch_end=keep_the_average)
    last = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])  # not the last step
    for weights, average in zip(validated, averages, strict=True):  # validated, every epoch
        assert all(torch.equal(weights[k], average[k]) for k in average)
    best = load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["model"]
    assert all(torch.equal(best[k], averages[result.best_epoch - 1][k]) for k in best)  # selected
    exported = load(tmp_path / "straight").module.state_dict()
    assert all(torch.equal(exported[k], best[k]) for k in best)  # exported

    # stopped within its second epoch, then resumed: the same average as the run never stopped
    stop, calls, per_epoch = StopRequest(), [], len(steps) // config.epochs

    def asked_to_stop_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == per_epoch + 2:
            stop.set(signal.SIGTERM)
        return step(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "_batch_gradients", asked_to_stop_in_the_second_epoch)
        assert train(config, manifest, tmp_path / "stopped", cache=cache, stop=stop).stopped_as_asked
    within = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "partial.pt")
    assert (within["epoch"], within["step"]) == (1, 2)
    train(None, manifest, tmp_path / "stopped", resume=True, cache=cache)
    resumed = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert all(torch.equal(resumed["ema"][k], last["ema"][k]) for k in last["ema"])
    with pytest.raises(ConfigError, match="ema must be 0"):
        tiny_config(ema=1.0)


def test_loading_processes_start_once_a_run_and_are_gone_when_it_ends(sample_root, cache_dir, tmp_path):
    # Forked anew every epoch, they were copies of a training process grown by what training allocates: two
    # of them ran a 24 GB machine out of memory (docs/RELIABILITY.md). They now serve every epoch of a run.
    loading = []

    def note_the_loading_processes(epoch: int, row: dict) -> None:
        loading.append(sorted(child.pid for child in multiprocessing.active_children()))

    config = tiny_config(epochs=3, workers=2, **{"augment.hflip": 0.5, "augment.rotation": 10})
    train(config, sample_manifest(sample_root), tmp_path / "run", cache=FeatureCache(cache_dir),
          on_epoch_end=note_the_loading_processes)  # fmt: skip
    assert len(loading[0]) == 2 and loading == [loading[0]] * 3
    assert not multiprocessing.active_children()


KILLABLE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training import sample_manifest, tiny_config
from fracdet.training import train
from fracdet.utils.cache import FeatureCache

def slow_down(epoch, row):
    if epoch == 1:
        Path({marker!r}).write_text("epoch 2 written")
        time.sleep(60)  # killed here, midway through the run

train(tiny_config(epochs=4), sample_manifest(Path({sample!r})), Path({run!r}), cache=FeatureCache({cache!r}),
      on_epoch_end=slow_down)
"""


def kill_when_marked(script: str, marker: Path, failure: str) -> None:
    """Run ``script`` in a Python process and kill it (SIGKILL) once it has written ``marker``."""
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "FRACDET_PROGRESS": "0"})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), failure
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_training_process_resumes_from_its_last_checkpoint(sample_root, cache_dir, tmp_path):
    marker, run = tmp_path / "marker", tmp_path / "killed"
    script = KILLABLE.format(tests=str(REPO / "tests"), marker=str(marker), sample=str(sample_root), run=str(run),
                             cache=str(cache_dir))  # fmt: skip
    kill_when_marked(script, marker, "the training process did not reach its second epoch")
    assert not list((run / "checkpoints").glob("*.tmp")), "a checkpoint was left half-written"
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    result = train(None, manifest, run, resume=True, cache=cache)
    assert list(result.history["epoch"]) == [1, 2, 3, 4]
    train(tiny_config(epochs=4), manifest, tmp_path / "straight", cache=cache)
    straight, resumed = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


KILLED_WITHIN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_training import sample_manifest, tiny_config
from fracdet.training import trainer
from fracdet.utils.cache import FeatureCache

def save_then_hang(path, state, save=trainer.save_checkpoint):
    save(path, state)
    if path.name == "partial.pt" and state["step"] == 2:
        Path({marker!r}).write_text("two batches of the first epoch saved")
        time.sleep(60)  # killed here, midway through the epoch

trainer.save_checkpoint = save_then_hang
trainer.train(tiny_config(**{config!r}), sample_manifest(Path({sample!r})), Path({run!r}),
              cache=FeatureCache({cache!r}))
"""


def test_a_training_process_killed_within_an_epoch_resumes_there_to_the_same_weights(
    sample_root, cache_dir, tmp_path, caplog
):
    # An epoch at full size takes an hour on two CPU cores: a sitting that ends midway must not lose it.
    config = {"epochs": 2, "dropout": 0.5, "augment.hflip": 0.5, "checkpoint_minutes": 1e-9}  # saved every batch
    marker, run = tmp_path / "marker", tmp_path / "killed"
    script = KILLED_WITHIN.format(tests=str(REPO / "tests"), marker=str(marker), sample=str(sample_root),
                                  run=str(run), cache=str(cache_dir), config=config)  # fmt: skip
    kill_when_marked(script, marker, "the training process did not save within its first epoch")
    assert not (run / "checkpoints" / "last.pt").exists() and (run / "checkpoints" / "partial.pt").is_file()
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    with pytest.raises(RunExistsError):  # started again by mistake: the saved batches are not overwritten
        train(tiny_config(**config), manifest, run, cache=cache)
    # a partial.pt of a later epoch whose last.pt is gone: refused, never silently trained from scratch
    shutil.copytree(run, orphan := tmp_path / "orphan")
    partial = load_checkpoint(orphan / "checkpoints" / "partial.pt")
    save_checkpoint(orphan / "checkpoints" / "partial.pt", {**partial, "epoch": 1})
    with pytest.raises(FileNotFoundError, match=r"last\.pt"):
        train(None, manifest, orphan, resume=True, cache=cache)
    with caplog.at_level(logging.INFO, logger="fracdet.training.trainer"):
        resumed = train(None, manifest, run, resume=True, cache=cache)
    assert "in epoch 1, after 2 of its batches" in caplog.text
    assert not (run / "checkpoints" / "partial.pt").exists()  # gone once its epoch ended
    # saving within epochs changes nothing learnt: a run that never did reaches the same weights and losses
    straight = train(tiny_config(**{**config, "checkpoint_minutes": 0}), manifest, tmp_path / "straight", cache=cache)
    assert not (tmp_path / "straight" / "checkpoints" / "partial.pt").exists()
    weights, resumed_weights = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss"]
    pd.testing.assert_frame_equal(straight.history[columns], resumed.history[columns])


SIGNALLED = """
import multiprocessing, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from fracdet.cli import main
from fracdet.training import trainer

calls, step = [], trainer._batch_gradients

def signalled_during_the_third_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        # from another process, to this one and its loading processes, as `pkill -f "fracdet train"` or a
        # scheduler stopping a process group sends it
        loading = [str(child.pid) for child in multiprocessing.active_children()]
        for _ in range({signals}):
            subprocess.run(["kill", "-s", "TERM", *loading], check=True)
            time.sleep(1)  # the loading processes' first: had one died of it, this process would hear so now
            subprocess.run(["kill", "-s", "TERM", str(os.getpid())], check=True)
    return step(*args, **kwargs)

trainer._batch_gradients = signalled_during_the_third_batch
sys.exit(main({args!r}))
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_training_run_sent_sigterm_stops_after_its_batch_saved_there_and_a_second_one_stops_it_at_once(
    sample_root, cache_dir, tmp_path, caplog, signals
):
    # A sitting's end, or room made for the tests, sends SIGTERM; an hour's epoch must not lose what it did
    # since its last checkpoint (checkpoints within epochs come every 10 minutes, so none comes here).
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    manifest[["path", "label", "group", "split"]].to_csv(tmp_path / "splits.csv", index=False)
    run, overrides = tmp_path / "run", [*TINY, "epochs=2", "dropout=0.5", "augment.hflip=0.5", "workers=2"]
    args = ["train", "--config", str(REPO / "configs" / "paper.yaml"), "--data", str(sample_root), "--splits",
            str(tmp_path / "splits.csv"), "--out", str(run), *[f"--set={o}" for o in overrides]]  # fmt: skip
    script = SIGNALLED.format(tests=str(REPO / "tests"), signals=signals, args=args)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "FRACDET_PROGRESS": "0", "FRACDET_CACHE": str(cache_dir)})  # fmt: skip
    checkpoints = run / "checkpoints"
    if signals == 2:  # the second is not waited for: the process ends as SIGTERM ends it, saving nothing
        assert done.returncode == -signal.SIGTERM and not any(checkpoints.iterdir())
        return
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert f"stopped by SIGTERM, saved where it stopped: continue with --resume --out {run}" in done.stderr
    assert not (checkpoints / "last.pt").exists() and load_checkpoint(checkpoints / "partial.pt")["step"] == 3
    with caplog.at_level(logging.INFO, logger="fracdet.training.trainer"):
        resumed = train(None, manifest, run, resume=True, cache=cache)
    assert "in epoch 1, after 3 of its batches" in caplog.text
    straight = train(tiny_config(epochs=2, dropout=0.5, **{"augment.hflip": 0.5}), manifest, tmp_path / "straight",
                     cache=cache)  # fmt: skip
    weights, resumed_weights = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss"]
    pd.testing.assert_frame_equal(straight.history[columns], resumed.history[columns])


def test_a_stop_request_is_set_by_the_first_signal_and_the_handlers_before_it_come_back():
    from fracdet.training.stopping import stop_on_signals

    before = signal.getsignal(signal.SIGUSR1)
    with stop_on_signals(signal.SIGUSR1) as stop:
        assert not stop.is_set() and signal.getsignal(signal.SIGUSR1) is not before
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.is_set() and stop.name == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is before  # the next one acts as it did before the block
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_stop_asked_after_the_last_batch_leaves_the_model_to_resume_and_one_asked_while_it_is_written_ends_there(
    sample_root, cache_dir, tmp_path, monkeypatch, capsys
):
    # At full size the last epoch's validation and the fit on validation take minutes: a stop asked then is
    # neither lost (a script that asked would go on to evaluate, or to its next seed) nor a half-written model.
    from fracdet.cli import main

    monkeypatch.setenv("FRACDET_CACHE", str(cache_dir))
    sample_manifest(sample_root)[["path", "label", "group", "split"]].to_csv(tmp_path / "splits.csv", index=False)

    def command(run: Path) -> list[str]:
        overrides = [f"--set={o}" for o in [*TINY, "epochs=2"]]
        return ["train", "--config", str(REPO / "configs" / "paper.yaml"), "--data", str(sample_root), "--splits",
                str(tmp_path / "splits.csv"), "--out", str(run), *overrides]  # fmt: skip

    def signalled_on_call(function, call: int):
        calls = []

        def signalled(*args, **kwargs):
            calls.append(1)
            if len(calls) == call:
                os.kill(os.getpid(), signal.SIGTERM)
            return function(*args, **kwargs)

        return signalled

    before = signal.getsignal(signal.SIGTERM)
    stopped, written = tmp_path / "stopped", tmp_path / "written"
    with monkeypatch.context() as patch:  # during the second (last) epoch's validation
        patch.setattr(trainer, "_score", signalled_on_call(trainer._score, call=2))
        assert main(command(stopped)) == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM, saved where it stopped: continue with --resume --out {stopped}" in (
        capsys.readouterr().err
    )
    assert (stopped / "checkpoints" / "last.pt").is_file() and not (stopped / "model.json").exists()
    with monkeypatch.context() as patch:  # while the model is written
        patch.setattr(trainer, "_export", signalled_on_call(trainer._export, call=1))
        assert main(command(written)) == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM once the model was written: {written} is complete" in capsys.readouterr().err
    assert (written / "model.json").is_file() and signal.getsignal(signal.SIGTERM) is before
    assert main(["train", "--resume", "--out", str(stopped)]) == 0  # writes the model it stopped before
    assert (stopped / "model.json").read_text() == (written / "model.json").read_text()
    assert (stopped / "model.safetensors").read_bytes() == (written / "model.safetensors").read_bytes()


def test_a_run_stopped_before_its_first_checkpoint_is_resumed_from_its_first_epoch(
    sample_root, cache_dir, tmp_path, monkeypatch, caplog
):
    # Killed within its first checkpoint_minutes, a run folder holds its config and splits and nothing learnt:
    # --resume trains it from the start, to the weights of an uninterrupted run, not "checkpoint not found".
    manifest, cache, config = sample_manifest(sample_root), FeatureCache(cache_dir), tiny_config(epochs=2)

    def stop_before_saving(path: Path, state: dict) -> None:
        raise SimulatedCrashError

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", stop_before_saving)
        with pytest.raises(SimulatedCrashError):
            train(config, manifest, tmp_path / "early", cache=cache)
    assert (tmp_path / "early" / "config.yaml").is_file() and not any((tmp_path / "early" / "checkpoints").iterdir())
    with caplog.at_level(logging.INFO, logger="fracdet.training.trainer"):
        resumed = train(None, manifest, tmp_path / "early", resume=True, cache=cache)
    assert "saved nothing before it stopped: starting it from epoch 1" in caplog.text
    assert list(resumed.history["epoch"]) == [1, 2]
    train(config, manifest, tmp_path / "straight", cache=cache)
    straight, early = _weights(tmp_path / "straight"), _weights(tmp_path / "early")
    assert all(torch.equal(straight[k], early[k]) for k in straight)


@pytest.mark.parametrize("saved", ["checkpoints/best.pt", "metrics.csv", "model.json"])
def test_a_new_run_never_overwrites_a_folder_that_holds_any_saved_work(sample_root, tmp_path, saved):
    # A run that lost last.pt still holds its best epoch, its rows or its finished model: a fresh start in
    # the same folder (a mistyped --out, a script run twice) is refused and names what it would overwrite.
    run = tmp_path / "run"
    (run / saved).parent.mkdir(parents=True, exist_ok=True)
    (run / saved).write_bytes(b"learnt")
    with pytest.raises(RunExistsError, match=re.escape(Path(saved).name)):
        train(tiny_config(), sample_manifest(sample_root), run)
    assert (run / saved).read_bytes() == b"learnt" and not (run / "config.yaml").exists()


# --- the hyper-parameter study -------------------------------------------------------------------


def test_sweep_trains_each_combination_once_and_tabulates_validation_metrics(sample_root, cache_dir, tmp_path):
    from fracdet.training.sweep import run_sweep

    manifest = sample_manifest(sample_root)
    grid = {"lrs": [0.01, 0.001], "batch_sizes": [8], "epochs": [1, 2], "cache": FeatureCache(cache_dir)}
    table = run_sweep(tiny_config(), manifest, tmp_path / "sweep", **grid)
    assert len(table) == 4
    assert {"lr", "batch_size", "epochs", "best_epoch", "val_auc", "val_accuracy"} <= set(table.columns)
    assert not any("test" in c for c in table.columns)
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n") == 4 + 2
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "sweep").glob("*/model.safetensors")}
    again = run_sweep(tiny_config(), manifest, tmp_path / "sweep", **grid)  # finished runs are read back
    assert again.drop(columns="seconds").equals(table.drop(columns="seconds"))
    assert all(p.stat().st_mtime == t for p, t in mtimes.items())


def test_sweep_reads_shorter_epoch_counts_off_one_run_when_the_schedule_ignores_the_total(
    sample_root, cache_dir, tmp_path
):
    from fracdet.training.sweep import epochs_share_a_run, run_sweep

    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    config = tiny_config(**{"augment.hflip": 0.5, "balance": "sampler"})  # constant rate, as in the paper
    assert epochs_share_a_run(config)
    grid = {"lrs": [0.01], "batch_sizes": [8], "epochs": [1, 3], "cache": cache}
    table = run_sweep(config, manifest, tmp_path / "sweep", **grid)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["lr0.01_bs8_ep3"]
    assert list(table["run"]) == ["lr0.01_bs8_ep3"] * 2
    assert table.loc[0, "best_epoch"] == 1
    # what the 1-epoch row claims is what a 1-epoch run of its own measures
    alone = train(config.with_overrides(["epochs=1"]), manifest, tmp_path / "alone", cache=cache).history.iloc[0]
    assert table.loc[0, ["val_loss", "val_auc", "val_accuracy"]].tolist() == pytest.approx(
        [alone["val_loss"], alone["val_auc"], alone["val_accuracy"]], abs=1e-6
    )


def test_sweep_trains_each_epoch_count_when_the_schedule_depends_on_it(sample_root, cache_dir, tmp_path):
    from fracdet.training.sweep import epochs_share_a_run, run_sweep

    config = tiny_config(**{"schedule.name": "cosine"})
    assert not epochs_share_a_run(config)
    grid = {"lrs": [0.01], "batch_sizes": [8], "epochs": [1, 2], "cache": FeatureCache(cache_dir)}
    table = run_sweep(config, sample_manifest(sample_root), tmp_path / "sweep", **grid)
    assert list(table["run"]) == ["lr0.01_bs8_ep1", "lr0.01_bs8_ep2"]


# --- the command line ---------------------------------------------------------------------------


def test_train_and_evaluate_from_the_command_line(sample_root, cache_dir, tmp_path, monkeypatch, capsys):
    from fracdet.cli import main

    monkeypatch.setenv("FRACDET_CACHE", str(cache_dir))
    manifest = sample_manifest(sample_root)
    manifest[["path", "label", "group", "split"]].to_csv(tmp_path / "splits.csv", index=False)
    run = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs" / "paper.yaml"), "--data", str(sample_root)]
    args += ["--splits", str(tmp_path / "splits.csv"), "--out", str(run)]
    args += [f"--set={o}" for o in [*TINY, "epochs=2"]]
    assert main(args) == 0
    assert main(args) == 2  # the run folder exists: a clear error, nothing overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run)]) == 0  # finished: resuming only re-exports
    # what --resume is asked is checked against the run, never silently dropped
    assert main(["train", "--resume", "--out", str(run), "--set", "epochs=3"]) == 2
    assert "differs from the run's in epochs" in capsys.readouterr().err
    assert main([*args, "--resume", "--set", "workers=1"]) == 0  # the first command again, on fewer loaders
    assert main(["evaluate", str(run), "--split", "val", "--bootstrap", "20", "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "report.html").is_file()
    # another dataset: the run's own manifest does not describe it, so the dataset's own split is used
    import shutil

    for label, src in (("fractured", "Fractured"), ("not fractured", "Non_fractured")):
        folder = tmp_path / "other" / "test" / label
        folder.mkdir(parents=True)
        for image in sorted((sample_root / "images" / src).glob("IMG00002*.jpg"))[:2]:
            shutil.copy(image, folder / image.name)
    capsys.readouterr()
    other = ["evaluate", str(run), "--data", str(tmp_path / "other"), "--split", "all", "--bootstrap", "10"]
    assert main([*other, "--no-heatmaps", "--out", str(tmp_path / "ev2")]) == 0
    assert "does not describe" in capsys.readouterr().out
    assert main(["train", "--config", str(tmp_path / "missing.yaml"), "--data", str(sample_root)]) == 2


# --- stability training and fine-tuning ------------------------------------------------------------


def test_each_training_image_comes_with_a_resaved_copy_when_stability_training_is_on():
    from torchvision import tv_tensors

    from fracdet.training.augment import AugmentedImages, build_twin
    from fracdet.training.config import StabilityConfig

    assert build_twin(StabilityConfig()) is None  # off by default: one image per item, as before
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    boxes = [([[0.2, 0.2, 0.6, 0.6]], []), ([], [])]
    data = AugmentedImages(images, np.array([1, 0]), annotations=boxes,
                           twin=build_twin(StabilityConfig(weight=1.0)))  # fmt: skip
    pair, label, mask = data[0]
    assert pair.shape == (2, 64, 64) and label == 1 and mask.shape == (64, 64)
    assert torch.equal(pair[0], torch.from_numpy(images[0]))  # the image itself (no augmentation here)
    assert not torch.equal(pair[1], pair[0])  # its copy, re-saved
    assert isinstance(pair, torch.Tensor) and not isinstance(pair, tv_tensors.Image)


def test_the_stability_copy_can_be_only_shrunk_with_no_codec_and_by_default_is_resaved_as_before():
    from PIL import Image
    from torchvision import tv_tensors

    from fracdet.training.augment import Reencode, build_twin
    from fracdet.training.config import ConfigError, StabilityConfig, TrainConfig

    image = tv_tensors.Image(torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 48, 40), dtype=np.uint8)))

    def shrunk_back(factor: float) -> np.ndarray:  # what losing resolution alone does, written out with Pillow
        grey = Image.fromarray(image[0].numpy())
        small = grey.resize((max(8, round(40 * factor)), max(8, round(48 * factor))), Image.Resampling.BILINEAR)
        return np.asarray(small.resize((40, 48), Image.Resampling.BILINEAR))

    only = build_twin(TrainConfig().with_overrides(["stability.weight=1", "stability.codecs=[]"]).stability)
    assert isinstance(only, Reencode) and only.codecs == ()
    for _ in range(5):
        params = only.make_params([image])
        assert params["format"] is None
        assert np.array_equal(only.transform(image, params)[0].numpy(), shrunk_back(params["factor"]))
    # with no shrinking either the copy would be the image itself: refused rather than trained on
    with pytest.raises(ConfigError, match="the copy is the image itself"):
        TrainConfig().with_overrides(["stability.weight=1", "stability.codecs=[]", "stability.rescale=0"])
    with pytest.raises(ConfigError, match=r"stability\.codecs"):
        StabilityConfig(weight=1.0, codecs=["png"]).check()
    with pytest.raises(ConfigError, match="twice"):
        StabilityConfig(weight=1.0, codecs=["jpeg", "jpeg"]).check()

    # the default copy is a JPEG or WebP round trip, drawn with the random numbers it always drew, so a run
    # resumed under this code goes on with the copies it started with
    default = build_twin(StabilityConfig(weight=1.0))
    assert default.codecs == ("JPEG", "WEBP")
    torch.manual_seed(7)
    drawn = [default.make_params([image]) for _ in range(40)]
    torch.manual_seed(7)
    for params in drawn:  # the draws as written before codecs could be chosen
        assert params["apply"] == bool(torch.rand(()) < 1.0)
        assert params["format"] == ("JPEG" if torch.rand(()) < 0.5 else "WEBP")
        assert params["quality"] == int(torch.randint(30, 96, ()))
        assert params["factor"] == 1.0 - 0.5 * float(torch.rand(()))
    assert {p["format"] for p in drawn} == {"JPEG", "WEBP"}
    webp = next(p for p in drawn if p["format"] == "WEBP")
    assert not np.array_equal(default.transform(image, webp)[0].numpy(), shrunk_back(webp["factor"]))


def test_the_stability_copy_can_also_be_moved_by_a_few_whole_pixels():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from fracdet.training.augment import AugmentedImages, Reencode, Shift, build_twin
    from fracdet.training.config import ConfigError, StabilityConfig, TrainConfig

    assert TrainConfig().with_overrides(["stability.shift=2"]).stability.shift == 2
    assert isinstance(build_twin(StabilityConfig(weight=1.0)), Reencode)  # not asked: the re-saved copy, as before
    twin = build_twin(StabilityConfig(weight=1.0, shift=2))
    assert isinstance(twin, v2.Compose) and isinstance(twin.transforms[0], Shift)
    with pytest.raises(ConfigError, match=r"stability\.shift"):
        StabilityConfig(weight=1.0, shift=-1).check()
    data = AugmentedImages(np.zeros((1, 16, 16), np.uint8), np.array([1]), twin=twin)
    assert data[0][0].shape == (2, 16, 16)

    image = tv_tensors.Image(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 12, 10), dtype=np.uint8)))
    shift, moves = Shift(2), set()
    for _ in range(60):
        params = shift.make_params([image])
        down, right = params["down"], params["right"]
        moves.add((down, right))
        moved = shift.transform(image, params)
        # what np.pad with the edge repeated gives: the pixels moved, the uncovered rows and columns the edge's
        padded = np.pad(image[0].numpy(), ((max(down, 0), max(-down, 0)), (max(right, 0), max(-right, 0))), "edge")
        expected = padded[max(-down, 0) : max(-down, 0) + 12, max(-right, 0) : max(-right, 0) + 10]
        assert isinstance(moved, tv_tensors.Image) and moved.dtype == torch.uint8
        assert np.array_equal(moved[0].numpy(), expected)
    assert {d for d, _ in moves} == {-2, -1, 0, 1, 2} and {r for _, r in moves} == {-2, -1, 0, 1, 2}


def test_the_stability_loss_is_the_change_of_the_verdicts_scores_squared_up_to_a_logit():
    from fracdet.training.losses import split_views, stability_loss, verdict_scores

    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 2.5], [1.0, 0.0]], requires_grad=True)
    images, copies = split_views(logits, 2)
    assert verdict_scores(images).squeeze(1).tolist() == [2.0, -1.0]
    assert stability_loss(images, copies).item() == pytest.approx(0.5 * 0.5**2 / 2)  # margins 2 -> 2.5, -1 -> -1
    far = torch.tensor([[0.0, 10.0]])
    assert stability_loss(far, far - torch.tensor([[0.0, 4.0]])).item() == pytest.approx(4 - 0.5)  # linear beyond
    stability_loss(images, copies).backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[2].abs().sum() > 0  # both sides are pulled
    # relative: in units of the spread of the scores, so shrinking every score does not lower it
    relative = stability_loss(images, copies, relative=True)
    assert relative.item() > 0
    assert stability_loss(images * 0.1, copies * 0.1, relative=True).item() == pytest.approx(relative.item())
    assert stability_loss(images * 0.1, copies * 0.1).item() < stability_loss(images, copies).item()
    image_logit, maps = torch.tensor([0.5, 0.5]), torch.zeros(2, 1, 4, 4)
    maps[1, 0, 2, 3] = 3.0  # a localiser: its image logit and its map's peak
    assert verdict_scores((image_logit, maps)).tolist() == [[0.5, 0.0], [0.5, 3.0]]


def test_stability_training_teaches_a_model_to_keep_its_scores_on_resaved_copies(sample_root, cache_dir, tmp_path):
    # Both fine-tunes score every image beside a re-saved copy and log the change of its score; only the
    # weighted one learns from it. (Whether a 32-px model trained on 27 images keeps that on images it has
    # not seen is noise: over seeds its held-out change ranged from a quarter of the plain model's to more.
    # `fracdet evaluate --stability` measures it on held-out radiographs at full scale.)
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    slow = {"optimizer.lr": 0.001}  # the tiny recipe's 0.01 makes these 32-px models erratic
    base = train(tiny_config(epochs=4, **slow), manifest, tmp_path / "base", cache=cache).out_dir
    tune = {"epochs": 4, "init_from": str(base), **slow}
    logged = train(tiny_config(**tune, **{"stability.weight": 1e-6}), manifest, tmp_path / "logged", cache=cache)
    stable = train(tiny_config(**tune, **{"stability.weight": 30}), manifest, tmp_path / "stable", cache=cache)
    plain = pd.read_csv(train(tiny_config(**tune), manifest, tmp_path / "plain", cache=cache).out_dir / "metrics.csv")
    assert "train_score_change" not in plain  # off by default: no second pass, nothing logged
    change = {
        run: result.history["train_score_change"].iloc[1:].mean()
        for run, result in (("logged", logged), ("stable", stable))
    }
    assert change["stable"] < 0.5 * change["logged"]  # over seeds 0-2: 0.24-0.33


def test_fine_tuning_starts_from_the_given_models_weights(sample_root, cache_dir, tmp_path):
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    base = train(tiny_config(epochs=1), manifest, tmp_path / "base", cache=cache).out_dir
    tuned = train(tiny_config(epochs=1, init_from=str(base), **{"optimizer.lr": 1e-12}), manifest,
                  tmp_path / "tuned", cache=cache).out_dir  # fmt: skip
    from fracdet.models import load

    before, after = dict(load(base).module.named_parameters()), dict(load(tuned).module.named_parameters())
    assert all(torch.allclose(before[k].float(), after[k].float(), atol=1e-3) for k in before)  # only BN stats moved
    with pytest.raises(ValueError, match="init_from"):
        train(tiny_config(epochs=1, init_from=str(base), model="efficientnet_lite0"), manifest, tmp_path / "x",
              cache=cache)  # fmt: skip


def test_progress_in_a_log_is_a_line_now_and_then_not_a_line_per_update():
    script = (
        "import os, time; os.environ['FRACDET_PROGRESS'] = '1'\n"
        "from fracdet.utils.progress import progress\n"
        "for _ in progress(range(2000), desc='work', total=2000): time.sleep(0.0005)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, lines  # stderr is a pipe here: the first and the last line, not 2,000
    assert "2000/2000" in lines[-1] and "img/s" in lines[-1]  # the rate, in the closing line


@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="torch.compile needs a C compiler")
def test_compiled_training_steps_train_the_weights_of_eager_ones(sample_root, cache_dir, tmp_path):
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    # no dropout (compiled code draws its own random numbers), the paper's learning rate
    settings = {"epochs": 1, "dropout": 0, "optimizer.lr": 0.001}
    train(tiny_config(**settings), manifest, tmp_path / "eager", cache=cache)
    train(tiny_config(**settings, compile=True), manifest, tmp_path / "compiled", cache=cache)
    eager, compiled = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("eager", "compiled"))
    for column in ("train_loss", "train_accuracy", "val_loss", "val_auc"):
        np.testing.assert_allclose(compiled[column], eager[column], rtol=1e-3, err_msg=column)
    eager, compiled = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    difference = torch.cat([(compiled[k].float() - eager[k].float()).abs().flatten() for k in eager])
    assert (difference > 1e-4).float().mean() < 0.01  # 99% of the weights agree within 1e-4
    # Adam turns the float rounding of a near-zero gradient into a step of up to the learning rate: at most
    # one per step (4 steps of 8 of the 27 training images) apart
    assert difference.max() <= 4 * 0.001


def test_a_batch_run_in_micro_batches_takes_the_whole_batchs_gradient_step():
    # A batch too large for memory runs in parts: without batch norm, the summed gradients are the batch's.
    from fracdet.training.trainer import _batch_gradients, _micro_batches, _preprocess

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 14 * 14, 2))  # fmt: skip
    x, y = torch.randint(0, 256, (7, 1, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 1, 0, 1, 0, 0])

    def gradients(micro_batch: int) -> tuple[list[torch.Tensor], list[float]]:
        config = TrainConfig(model="paper_cnn", image_size=16, batch_size=7, micro_batch=micro_batch)
        network.zero_grad()
        sums = _batch_gradients(network, x, y, None, config=config, preprocess=_preprocess(config),
                                use_amp=False, class_weight=None)  # fmt: skip
        return [p.grad.clone() for p in network.parameters()], sums.tolist()

    assert [(p.start, p.stop) for p in _micro_batches(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    whole, whole_sums = gradients(0)
    for micro_batch in (1, 3, 7):
        parts, sums = gradients(micro_batch)
        for a, b in zip(parts, whole, strict=True):
            torch.testing.assert_close(a, b)
        np.testing.assert_allclose(sums, whole_sums, rtol=1e-6)  # the epoch's loss, verdicts and count


def test_a_micro_batch_of_the_whole_batch_trains_the_run_without_micro_batches(sample_root, cache_dir, tmp_path):
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    settings = {"epochs": 1, "dropout": 0}
    train(tiny_config(**settings), manifest, tmp_path / "whole", cache=cache)
    train(tiny_config(**settings, micro_batch=8), manifest, tmp_path / "parts", cache=cache)
    whole, parts = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_augmenting_on_the_device_gives_the_batches_the_loader_gives():
    from fracdet.training.augment import AugmentedImages, Draw, build_augmentation, build_twin
    from fracdet.training.config import StabilityConfig

    recipe = load_config(REPO / "configs" / "localiser.yaml")  # flips, affine, contrast, JPEG/WebP, rescaling
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64), dtype=np.uint8)
    boxes = [([[0.1 * k, 0.2, 0.1 * k + 0.3, 0.6]], []) for k in range(6)]

    def dataset(defer: bool) -> AugmentedImages:
        return AugmentedImages(images, np.arange(6) % 2, build_augmentation(recipe.augment), annotations=boxes,
                               twin=build_twin(StabilityConfig(weight=1.0)), seed=4, defer=defer)  # fmt: skip

    loader, deferred = dataset(False), dataset(True)
    items = [Draw(epoch=2, position=position, index=(3 * position) % 6) for position in range(6)]
    expected = torch.utils.data.default_collate([loader[item] for item in items])
    raw = torch.utils.data.default_collate([deferred[item] for item in items])
    assert raw[0].shape == (6, 1, 64, 64)  # as stored: one view, not augmented yet
    x, mask = deferred.augment_batch(raw[0], raw[2], items)
    assert x.shape == expected[0].shape == (6, 2, 64, 64)
    assert torch.equal(x, expected[0]) and torch.equal(mask, expected[2])
    assert not torch.equal(x[:, :1], raw[0])  # it did augment


def test_a_run_augmented_on_the_device_trains_the_run_augmented_in_the_loader(sample_root, cache_dir, tmp_path):
    manifest, cache = sample_manifest(sample_root), FeatureCache(cache_dir)
    settings = {"epochs": 2, "augment.hflip": 0.5, "augment.rotation": 10, "augment.contrast": 0.2}
    train(tiny_config(**settings), manifest, tmp_path / "loader", cache=cache)
    train(tiny_config(**settings, augment_on="device"), manifest, tmp_path / "device", cache=cache)
    loader, device = (pd.read_csv(tmp_path / run / "metrics.csv") for run in ("loader", "device"))
    columns = ["train_loss", "train_accuracy", "val_loss", "val_auc"]
    pd.testing.assert_frame_equal(device[columns], loader[columns])
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "device").values(),
                                                  _weights(tmp_path / "loader").values(), strict=True))  # fmt: skip
