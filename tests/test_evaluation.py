"""Evaluation: metric definitions, intervals, operating points, calibration, and the report of a run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fracdet.evaluation import (
    binary_metrics,
    bootstrap_interval,
    bootstrap_intervals,
    evaluate,
    expected_calibration_error,
    specificity_at_sensitivity,
    subgroup_metrics,
    threshold_choice_intervals,
    write_report,
)
from fracdet.models import load
from fracdet.training import choose_thresholds, fit_temperature, probabilities, train
from fracdet.utils.cache import FeatureCache
from tests.test_training import sample_manifest, tiny_config


def test_metrics_follow_their_definitions():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.3, 0.2, 0.1, 0.1, 0.05])
    m = binary_metrics(labels, probs, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: of 24 positive-negative pairs, 3 are ordered wrongly (0.6<0.7, 0.2<0.7, 0.2<0.3), one is tied
    assert m["auc"] == pytest.approx((24 - 3 - 0.5) / 24)
    assert np.isnan(binary_metrics(np.zeros(3), np.ones(3) * 0.2, 0.5)["sensitivity"])


def test_specificity_at_sensitivity_reads_the_roc_curve_without_choosing_a_threshold_elsewhere():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.2, 0.7, 0.3, 0.2, 0.1, 0.1, 0.05])
    assert specificity_at_sensitivity(labels, probs, 0.75) == pytest.approx(5 / 6)  # cut at 0.6: only 0.7 above
    assert specificity_at_sensitivity(labels, probs, 0.90) == pytest.approx(3 / 6)  # cut at 0.2 keeps the tie
    assert specificity_at_sensitivity(labels, probs, 0.50) == pytest.approx(1.0)
    assert np.isnan(specificity_at_sensitivity(np.ones(4), probs[:4], 0.9))
    lo, hi = bootstrap_interval(lambda y, p: specificity_at_sensitivity(y, p, 0.75), labels, probs, n_boot=200)
    assert lo <= 5 / 6 <= hi and lo < hi


def test_bootstrap_intervals_cover_the_estimate_and_widen_for_copies():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    point = binary_metrics(labels, probs, 0.5)
    ci = bootstrap_intervals(labels, probs, 0.5, n_boot=300)
    for name in ("accuracy", "sensitivity", "auc"):
        assert ci[name][0] <= point[name] <= ci[name][1]
    # the same 200 images, each present 5 times: 5x the images, but no more information
    copies = np.repeat(np.arange(200), 5)
    naive = bootstrap_intervals(labels[copies], probs[copies], 0.5, n_boot=300)
    grouped = bootstrap_intervals(labels[copies], probs[copies], 0.5, groups=copies, n_boot=300)
    width = lambda c: c["auc"][1] - c["auc"][0]  # noqa: E731
    assert width(grouped) > 1.7 * width(naive)
    assert width(grouped) == pytest.approx(width(ci), rel=0.3)


def test_thresholds_are_chosen_for_their_targets():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(labels * 0.25 + rng.random(500) * 0.75, 0, 1)
    t = choose_thresholds(labels, scores)
    for name, target in (("sens90", 0.90), ("sens95", 0.95)):
        sens = binary_metrics(labels, scores, t[name])["sensitivity"]
        assert sens >= target
        # the highest such threshold: a hair higher loses the target
        assert binary_metrics(labels, scores, t[name] + 1e-9)["sensitivity"] < target
    assert t["sens95"] <= t["sens90"]


def test_threshold_choice_intervals_show_how_far_a_validation_chosen_operating_point_moves():
    rng = np.random.default_rng(2)

    def scores(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
        return labels, 1 / (1 + np.exp(-(rng.normal(size=len(labels)) + 2 * labels)))

    test_labels, test_probs = scores(2000, 8000)
    widths = {}
    for n_pos in (30, 3000):  # validation fractures
        val_labels, val_probs = scores(n_pos, 4 * n_pos)
        moves = threshold_choice_intervals(val_labels, val_probs, test_labels, test_probs, choose_thresholds,
                                           n_boot=200)  # fmt: skip
        chosen = choose_thresholds(val_labels, val_probs)["sens90"]
        sens90 = moves["sens90"]
        assert sens90["threshold"][0] <= chosen <= sens90["threshold"][1]
        spec = binary_metrics(test_labels, test_probs, chosen)["specificity"]
        assert sens90["specificity"][0] <= spec <= sens90["specificity"][1]
        assert moves["0.5"]["threshold"] == (0.5, 0.5)  # a fixed rule does not move
        widths[n_pos] = sens90["specificity"][1] - sens90["specificity"][0]
    # about a hundred times fewer fractures: about ten times wider
    assert widths[30] > 5 * widths[3000]


def test_temperature_scaling_recovers_an_overconfident_model():
    rng = np.random.default_rng(2)
    true_margin = rng.normal(0, 2, 20000)
    labels = (rng.random(20000) < probabilities(true_margin)).astype(int)
    overconfident = 3.0 * true_margin
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(labels, probabilities(overconfident))
    after = expected_calibration_error(labels, probabilities(overconfident, temperature))
    assert after < before / 3


def test_subgroups_by_fracture_size_rank_those_fractures_against_every_normal_image():
    from fracdet.data.sources import FRACTURE_SIZES

    (_, small_name), _, (_, large_name) = FRACTURE_SIZES
    predictions = pd.DataFrame({
        "label":         [1, 1, 1, 1, 0, 0, 0, 0],
        "probability":   [0.9, 0.8, 0.2, 0.6, 0.1, 0.3, 0.4, 0.7],
        "region":        ["hand", "hand", "leg", "leg", "hand", "hand", "leg", "leg"],
        "hardware":      [True, False, False, False, False, False, False, False],
        "fracture_size": [large_name, large_name, small_name, small_name, None, None, None, None],
    })  # fmt: skip
    table = subgroup_metrics(predictions, threshold=0.5).set_index(["by", "value"])
    assert list(table.loc["fracture_size"].index) == [small_name, large_name]  # by size, not alphabetically
    small, large = table.loc[("fracture_size", small_name)], table.loc[("fracture_size", large_name)]
    assert (small["images"], small["fractures"]) == (6, 2) and (large["images"], large["fractures"]) == (6, 2)
    assert small["sensitivity"] == 0.5 and large["sensitivity"] == 1.0
    assert small["specificity"] == large["specificity"] == 0.75  # every normal image, in both rows
    assert large["auc"] == 1.0 and small["auc"] == pytest.approx((1 + 3) / 8)  # 0.2 and 0.6 beat one and three normals
    assert table.loc[("hardware", "yes"), "images"] == 1 and table.loc[("hardware", "no"), "images"] == 7
    leg = table.loc[("region", "leg")]
    assert (leg["images"], leg["fractures"], leg["specificity"]) == (4, 2, 0.5)


def three_way_manifest(root):
    """The bundled sample with every third file in validation, the next in test and the rest in training."""
    manifest = sample_manifest(root)
    manifest["split"] = np.where(np.arange(len(manifest)) % 3 == 1, "test", manifest["split"])
    return manifest


@pytest.fixture(scope="module")
def tiny_run(sample_root_module, tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(epochs=2), three_way_manifest(sample_root_module), run, cache=FeatureCache(cache_dir))
    return run


@pytest.fixture(scope="module")
def sample_root_module():
    from tests.conftest import SAMPLE

    return SAMPLE


def test_evaluate_writes_metrics_pictures_and_report(tiny_run, sample_root_module, cache_dir, tmp_path):
    model = load(tiny_run)
    manifest = three_way_manifest(sample_root_module)
    result = evaluate(model, manifest, split="test", n_boot=50, cache=FeatureCache(cache_dir))
    assert set(result.points) == {"0.5", "youden", "sens90", "sens95", "spec95"}
    assert result.thresholds_from.startswith("val")
    report = write_report(result, tmp_path / "eval")
    for name in ("metrics.json", "predictions.csv", "roc.png", "pr.png", "confusion.png", "calibration.png",
                 "gallery.png"):  # fmt: skip
        assert (tmp_path / "eval" / name).is_file(), name
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert data["checkpoint_selected_on"] == "val" and data["warning"] is None
    assert data["images"] == len(result.predictions) > 0
    assert {"auc", "sensitivity"} <= set(data["operating_points"]["sens90"]["ci95"])
    moves = data["operating_points"]["sens90"]["threshold_choice_ci95"]
    assert moves["threshold"][0] <= result.thresholds["sens90"] <= moves["threshold"][1]
    assert set(result.subgroups["by"]) >= {"region", "view", "fracture_size"}
    roc = data["roc_specificity_at_sensitivity"]
    assert set(roc) == {"0.90", "0.95"} and roc["0.95"]["specificity"] <= roc["0.90"]["specificity"]
    html = report.read_text()
    assert "data:image/png;base64" in html and 'class="warn"' not in html


def test_a_test_selected_model_is_flagged_in_every_output(tiny_run, sample_root_module, cache_dir, tmp_path):
    meta_path = tiny_run / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["selected_on"] = "test"
    flagged = tmp_path / "flagged"
    flagged.mkdir()
    (flagged / "model.json").write_text(json.dumps(meta))
    (flagged / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes())
    manifest = sample_manifest(sample_root_module)
    result = evaluate(load(flagged), manifest, split="val", n_boot=20, cache=FeatureCache(cache_dir))
    write_report(result, tmp_path / "eval")
    assert "TEST split" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["warning"]
    assert "TEST split" in (tmp_path / "eval" / "report.html").read_text()


def test_a_release_older_than_spec95_is_evaluated_on_its_validation_split(tiny_run, sample_root_module, cache_dir,
                                                                          tmp_path):  # fmt: skip
    meta = json.loads((tiny_run / "model.json").read_text())
    del meta["thresholds"]["spec95"]  # as 0.3.0's model.json: four operating points
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.json").write_text(json.dumps(meta))
    (old / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes())
    result = evaluate(load(old), sample_manifest(sample_root_module), split="val", n_boot=20,
                      cache=FeatureCache(cache_dir))  # fmt: skip
    assert set(result.points) == {"0.5", "youden", "sens90", "sens95"}
    write_report(result, tmp_path / "eval")
    assert "spec95" not in json.loads((tmp_path / "eval" / "metrics.json").read_text())["operating_points"]


def test_load_reads_run_folders_and_checkpoints_and_names_unknown_models(tiny_run):
    from_folder = load(tiny_run)
    from_checkpoint = load(tiny_run / "checkpoints" / "last.pt")
    assert from_folder.arch == from_checkpoint.arch == "paper_cnn"
    assert from_folder.thresholds and not from_checkpoint.thresholds  # a checkpoint is not calibrated yet
    images = np.zeros((3, 32, 32), np.uint8)
    p = from_folder.predict_proba(images)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    with pytest.raises(FileNotFoundError, match="no model"):
        load("no-such-model")


def test_a_released_run_loads_by_name_and_carries_its_reported_numbers(tiny_run, sample_root_module, cache_dir,
                                                                       tmp_path, monkeypatch):  # fmt: skip
    from fracdet.models import list_releases, package_release

    manifest = sample_manifest(sample_root_module)
    result = evaluate(load(tiny_run), manifest, split="val", n_boot=20, cache=FeatureCache(cache_dir))
    write_report(result, tmp_path / "eval")
    monkeypatch.setenv("FRACDET_MODELS", str(tmp_path / "models"))
    package_release(tiny_run, "tiny-release", version="9.9", report=tmp_path / "eval" / "metrics.json",
                    command="fracdet evaluate tiny-release --split val")  # fmt: skip
    assert list_releases() == ["tiny-release"]
    released = load("tiny-release")
    assert released.version == "9.9" and released.splits_path is not None
    reported = released.meta["reported"]
    assert reported["val"]["auc"] == pytest.approx(result.points["sens90"]["auc"])
    assert reported["command"] == "fracdet evaluate tiny-release --split val"


def test_a_release_from_a_tta_report_scores_with_the_mirror_everywhere(tiny_run, sample_root_module, cache_dir,
                                                                       tmp_path, monkeypatch):  # fmt: skip
    from scipy.special import logit

    from fracdet.inference import Predictor
    from fracdet.models import package_release

    manifest = three_way_manifest(sample_root_module)
    result = evaluate(load(tiny_run), manifest, split="test", n_boot=20, tta=True, cache=FeatureCache(cache_dir))
    write_report(result, tmp_path / "eval")
    monkeypatch.setenv("FRACDET_MODELS", str(tmp_path / "models"))
    package_release(tiny_run, "tiny-tta", version="1.0", report=tmp_path / "eval" / "metrics.json")
    released = load("tiny-tta")

    # The release carries the calibration that was fitted on validation margins scored with the mirror.
    assert released.tta and not load(tiny_run).tta
    assert released.temperature == pytest.approx(result.temperature)
    assert released.threshold == pytest.approx(result.thresholds["sens90"])
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    plain, flipped = released.margins(images, tta=False), released.margins(images[:, :, ::-1].copy(), tta=False)
    assert np.abs(plain - flipped).min() > 0.01  # the mirror moves each score 5x more than the checks below allow
    np.testing.assert_allclose(released.margins(images), (plain + flipped) / 2, rtol=1e-5)
    # The predictor (CLI and web page) gives the same verdict, heatmap or not.
    for heatmaps in (True, False):
        predictor = Predictor(released, heatmaps=heatmaps, gate=False)  # 32-px noise: the gate would refuse it
        prediction = predictor.predict_pixels(images[0].astype(np.float32) / 255)
        margin = released.temperature * logit(prediction.probability)
        assert margin == pytest.approx((plain[0] + flipped[0]) / 2, rel=1e-4)
    # Re-evaluating the release applies its own setting and reproduces the report.
    again = evaluate(released, manifest, split="test", n_boot=20, cache=FeatureCache(cache_dir))
    assert again.tta and again.points["sens90"]["auc"] == pytest.approx(result.points["sens90"]["auc"])


def test_a_release_refuses_a_tta_report_whose_thresholds_were_not_refitted(tiny_run, sample_root_module, cache_dir,
                                                                          tmp_path):  # fmt: skip
    from fracdet.models import package_release

    manifest = sample_manifest(sample_root_module)
    result = evaluate(load(tiny_run), manifest, split="val", n_boot=20, tta=True, cache=FeatureCache(cache_dir))
    write_report(result, tmp_path / "eval")
    with pytest.raises(ValueError, match="test-time augmentation"):
        package_release(tiny_run, "tiny-tta", version="1.0", report=tmp_path / "eval" / "metrics.json",
                        dest=tmp_path / "models")  # fmt: skip
    assert not (tmp_path / "models").exists()


def test_stability_reports_flips_and_probability_changes_per_re_encoding(tiny_run, sample_root_module, cache_dir,
                                                                         tmp_path):  # fmt: skip
    from fracdet.data.table import absolute_paths
    from fracdet.evaluation.stability import VARIANTS, verdict_stability

    model = load(tiny_run)
    manifest = three_way_manifest(sample_root_module)
    result = evaluate(model, manifest, split="test", n_boot=50, cache=FeatureCache(cache_dir), stability=True)
    stability = result.stability
    assert set(stability["variants"]) == set(VARIANTS) and stability["images"] == len(result.predictions)
    for variant in stability["variants"].values():
        lo, hi = variant["flip_rate_ci95"]
        assert 0 <= lo <= variant["flip_rate"] <= hi <= 1
        assert 0 <= variant["median_abs_change"] <= variant["p90_abs_change"] <= variant["max_abs_change"]
        assert 0 <= variant["flips_near_threshold"] <= variant["flips"]
        clear = stability["images"] - stability["near_threshold"]  # the verdicts not called borderline
        expected = (variant["flips"] - variant["flips_near_threshold"]) / clear if clear else None
        assert variant["flip_rate_not_borderline"] == (pytest.approx(expected) if clear else None)
    assert 0 <= stability["near_threshold"] <= stability["images"]
    report = write_report(result, tmp_path)
    text = report.read_text()
    assert (tmp_path / "stability.png").is_file() and "Verdict stability" in text
    assert f"{stability['near_threshold']} of {stability['images']} files score within 0.5 logit" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["stability"]["variants"]["jpeg75"]

    rows = manifest[manifest["split"] == "test"]
    rows.attrs.update(manifest.attrs)
    paths = absolute_paths(rows)
    same = verdict_stability(model, paths, None, threshold=0.5, variants={"as read": lambda p: p}, n_boot=20)
    assert same["variants"]["as read"]["max_abs_change"] == 0 and same["variants"]["as read"]["flips"] == 0
    middle = float(np.sort(result.predictions["probability"])[len(result.predictions) // 2])  # a file's own score
    blank = verdict_stability(model, paths, None, threshold=middle, variants={"blank": np.zeros_like}, n_boot=20)
    assert blank["variants"]["blank"]["flips"] > 0  # a test that can fail: destroying the image changes verdicts
    assert blank["near_threshold"] >= 1  # the middle file scores at the threshold itself


def test_a_model_is_neither_scored_nor_fitted_on_the_files_it_was_trained_on(tiny_run, sample_root_module, cache_dir):
    """Scored on its training files a model shows its memory, and thresholds fitted on them sit where no new
    patient's score does. Under its own manifest nothing is left out."""
    from fracdet.training.recalibrate import fit_on_val

    model, own = load(tiny_run), three_way_manifest(sample_root_module)
    assert evaluate(model, own, split="test", n_boot=10, cache=FeatureCache(cache_dir)).left_out_trained_on == {}
    trained = own["split"] == "train"
    resplit = own.assign(split=np.where(trained, "test", own["split"]))  # its training files join the test split
    result = evaluate(model, resplit, split="test", n_boot=10, cache=FeatureCache(cache_dir))
    scored = set(result.predictions["path"])
    assert scored and scored <= set(own.loc[own["split"] == "test", "path"])
    assert result.to_dict()["left_out_trained_on"] == {"test": int(trained.sum())}
    with pytest.raises(ValueError, match=r"no rows in split 'test' \(\d+ left out: tiny was trained on them\)"):
        evaluate(model, own.assign(split=np.where(trained, "test", "val")), split="test", n_boot=10)
    with pytest.raises(ValueError, match="no 'val' rows that the model was not trained on"):
        fit_on_val(model, own.assign(split=np.where(trained, "val", "test")))


def test_the_shipped_model_scored_on_a_split_of_the_sample_keeps_the_thresholds_it_was_made_with(sample_root,
                                                                                                 tmp_path):  # fmt: skip
    """Found by hand: the sample's files are FracAtlas files, most of them in the default's training split; a
    split drawn from the sample put them in validation, whose fit chose a threshold of 1.000."""
    from fracdet.cli import main
    from fracdet.data import load_dataset
    from fracdet.data.split import read_split_manifest

    default = load("fracatlas-default")
    trained = set(read_split_manifest(default.splits_path).query("split == 'train'")["path"])
    table = load_dataset(sample_root)
    seen = table["path"].isin(trained).to_numpy()
    alternate = np.cumsum(seen) % 2 == 0
    table["split"] = np.where(seen & alternate, "val", "test")  # its training files in both; the others in test
    table[["path", "label", "split"]].to_csv(tmp_path / "splits.csv", index=False)
    out = tmp_path / "eval"
    args = ["--splits", str(tmp_path / "splits.csv"), "--no-heatmaps", "--bootstrap", "10", "--out", str(out)]
    assert main(["evaluate", "fracatlas-default", "--data", str(sample_root), "--split", "test", *args]) == 0
    report = json.loads((out / "metrics.json").read_text())
    left_out = {"val": int((seen & alternate).sum()), "test": int((seen & ~alternate).sum())}
    assert report["left_out_trained_on"] == left_out
    scored = set(pd.read_csv(out / "predictions.csv")["path"])
    assert scored and scored <= set(table.loc[~seen, "path"])  # the sample's truncated file is not scored either
    assert report["thresholds_from"] == "stored with the model"
    assert report["thresholds"] == pytest.approx(default.thresholds)


def test_near_threshold_counts_scores_within_half_a_logit_of_it():
    from scipy.special import expit, logit

    from fracdet.evaluation.stability import near_threshold

    t = 0.1
    p = expit(logit(t) + np.array([-0.6, -0.4, 0.0, 0.4, 0.6, -12.0, 12.0]))
    assert near_threshold(p, t).tolist() == [False, True, True, True, False, False, False]
    assert near_threshold(np.array([0.0, 1.0]), t).tolist() == [False, False]  # certain scores are far from any
    assert near_threshold(p, t, logits=0.7)[[0, 4]].all()
