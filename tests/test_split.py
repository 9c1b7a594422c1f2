"""Splits: stratified, grouped, deterministic, and leakage-free by the audit's own measure."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from fracdet.data import DuplicateConfig, audit_dataset, load_dataset, make_splits
from fracdet.data.split import SplitResult, assign_splits


@pytest.fixture
def grouped_labels():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 12, 400)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    labels = np.repeat(rng.random(len(sizes)) < 0.3, sizes).astype(int)
    return labels, groups


def test_class_fractions_within_two_points(grouped_labels):
    labels, groups = grouped_labels
    splits = assign_splits(labels, groups, (0.7, 0.15, 0.15), seed=0)
    whole = labels.mean()
    for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        member = splits == name
        assert abs(labels[member].mean() - whole) <= 0.02
        assert abs(member.mean() - share) <= 0.02


def test_no_group_crosses_splits(grouped_labels):
    labels, groups = grouped_labels
    splits = assign_splits(labels, groups, seed=1)
    for g in np.unique(groups):
        assert len(set(splits[groups == g])) == 1


def test_same_seed_same_split_other_seed_other_split(grouped_labels):
    labels, groups = grouped_labels
    a = assign_splits(labels, groups, seed=5)
    assert (a == assign_splits(labels, groups, seed=5)).all()
    assert (a != assign_splits(labels, groups, seed=6)).any()


def test_bad_fractions_are_refused(grouped_labels):
    labels, groups = grouped_labels
    with pytest.raises(ValueError, match="positive"):
        assign_splits(labels, groups, (0.8, 0.0, 0.2))


def test_sample_split_leaves_out_truncated_files_and_has_no_leakage(sample_root, cache_dir, tmp_path):
    table = load_dataset(sample_root)
    config = DuplicateConfig(cache_dir=str(cache_dir))
    result = make_splits(table, seed=0, config=config)
    assert result.excluded["path"].tolist() == ["images/Non_fractured/IMG0004028.jpg"]
    assert result.excluded["reason"].tolist() == ["truncated"]
    manifest = result.manifest.set_index("path")
    # exact copies share a group and therefore a split
    assert (
        manifest.loc["images/Fractured/IMG0000261.jpg", "split"]
        == manifest.loc["images/Fractured/IMG0002299.jpg", "split"]
    )
    assert manifest.groupby("group")["split"].nunique().max() == 1
    out = result.write(tmp_path / "splits.csv")
    assert out.with_suffix(".excluded.csv").exists()
    reloaded = load_dataset(out, data_root=sample_root)
    report = audit_dataset(reloaded, config=config)
    assert report.leaked_files.empty
    assert (report.leakage[["exact_copies_in_other", "near_copies_in_other"]] == 0).all().all()


def test_keep_published_split_reports_what_leaks_in_it(sample_root, cache_dir, tmp_path, capsys):
    from fracdet.cli import main

    from .images import save

    raw = (sample_root / "images/Fractured/IMG0000261.jpg").read_bytes()
    save(tmp_path / "data" / "train" / "fractured" / "a.jpg", raw)
    save(tmp_path / "data" / "test" / "fractured" / "a-copy.jpg", raw)
    save(
        tmp_path / "data" / "train" / "normal" / "b.jpg",
        (sample_root / "images/Non_fractured/IMG0000224.jpg").read_bytes(),
    )
    save(
        tmp_path / "data" / "test" / "normal" / "c.jpg",
        (sample_root / "images/Non_fractured/IMG0000265.jpg").read_bytes(),
    )
    out = tmp_path / "published.csv"
    args = ["split", str(tmp_path / "data"), "--out", str(out), "--keep-published", "--cache-dir", str(cache_dir)]
    assert main(args) == 0
    assert "test -> train: 1/2 files have a byte-identical copy in train" in capsys.readouterr().out
    manifest = load_dataset(out, data_root=tmp_path / "data").set_index("path")
    assert manifest.loc["test/fractured/a-copy.jpg", "split"] == "test"  # the published split is kept
    assert manifest.loc["test/fractured/a-copy.jpg", "group"] == manifest.loc["train/fractured/a.jpg", "group"]


def test_repair_moves_groups_that_straddle_splits_to_their_first_split_and_keeps_everything_else(
    sample_root, cache_dir, tmp_path, capsys
):
    from fracdet.cli import main

    table = load_dataset(sample_root)
    config = DuplicateConfig(cache_dir=str(cache_dir))
    old = make_splits(table, seed=0, config=config)
    manifest = old.manifest.set_index("path")
    # An older audit that missed the copies: IMG0000261 and its exact copy IMG0002299 on both held-out sides,
    # and a training file's group-mate (in its own group before) put in test.
    manifest.loc["images/Fractured/IMG0000261.jpg", "split"] = "test"
    manifest.loc["images/Fractured/IMG0002299.jpg", "split"] = "val"
    trained = manifest.index[(manifest["split"] == "train") & (manifest["group"].duplicated(keep=False))][:1]
    assert len(trained) == 1  # the sample has copies, so some training group holds two files
    mate = manifest.index[(manifest["group"] == manifest.loc[trained[0], "group"]) & (manifest.index != trained[0])]
    manifest.loc[mate, "split"] = "test"
    tampered = tmp_path / "old.csv"
    SplitResult(manifest.reset_index(), old.excluded).write(tampered)

    out = tmp_path / "repaired.csv"
    assert (
        main(["split", str(sample_root), "--repair", str(tampered), "--out", str(out), "--cache-dir", str(cache_dir)])
        == 0
    )
    assert "moved to the first of their splits" in capsys.readouterr().out
    repaired = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert repaired.loc["images/Fractured/IMG0000261.jpg", "split"] == "val"  # val comes before test
    assert repaired.loc["images/Fractured/IMG0000261.jpg", "moved_from"] == "test"
    assert repaired.loc["images/Fractured/IMG0002299.jpg", "moved_from"] == ""
    assert (repaired.loc[mate, "split"] == "train").all()  # held-out files only ever move towards train
    moved = repaired["moved_from"] != ""
    assert moved.sum() == 1 + len(mate)
    assert (repaired.loc[~moved, "split"] == manifest.loc[repaired.index[~moved], "split"]).all()
    assert set(repaired.index[repaired["split"] == "test"]) <= set(manifest.index[manifest["split"] == "test"])
    assert pd.read_csv(out.with_suffix(".excluded.csv"))["reason"].tolist() == ["truncated"]
    report = audit_dataset(load_dataset(out, data_root=sample_root), config=config)
    assert report.leaked_files.empty


def test_apply_manifest_takes_split_and_copy_groups_and_keeps_metadata(sample_root, tmp_path):
    from fracdet.data.split import apply_manifest

    table = load_dataset(sample_root)
    manifest = table[["path", "label"]].iloc[:10].assign(split="train", group="g0")
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = apply_manifest(table, tmp_path / "m.csv")
    assert len(out) == 10 and set(out["split"]) == {"train"} and set(out["group"]) == {"g0"}
    assert "region" in out and out.attrs["root"] == table.attrs["root"]
    stranger = pd.DataFrame({"path": ["elsewhere/x.jpg"], "label": [0], "split": ["train"]})
    with pytest.raises(ValueError, match="not in the dataset"):
        apply_manifest(table, stranger)


def test_files_a_manifest_trains_on_are_left_out_of_every_other_split_and_counted(sample_root, tmp_path):
    from fracdet.data.split import leave_out_trained_on

    table = load_dataset(sample_root)
    table["split"] = np.resize(["train", "val", "test"], len(table))
    manifest = table[["path", "label"]].assign(split=np.resize(["val", "train"], len(table)))
    manifest.to_csv(tmp_path / "m.csv", index=False)
    out = leave_out_trained_on(table, tmp_path / "m.csv", model="m")
    trained = set(manifest.loc[manifest["split"] == "train", "path"])
    assert not (set(out.loc[out["split"] != "train", "path"]) & trained)  # none of its training files is scored
    assert (out["split"] == "train").sum() == (table["split"] == "train").sum()  # training rows are not scored
    expected = table[table["path"].isin(trained) & (table["split"] != "train")]["split"].value_counts().to_dict()
    assert out.attrs["left_out_trained_on"] == expected and sum(expected.values()) > 0
    assert out.attrs["root"] == table.attrs["root"]
    again = leave_out_trained_on(out, tmp_path / "m.csv", model="m")  # idempotent: the counts stay
    assert len(again) == len(out) and again.attrs["left_out_trained_on"] == expected
    assert leave_out_trained_on(table, None).attrs["left_out_trained_on"] == {}


@pytest.mark.parametrize("shares", [("-1", "1", "1"), ("nan", "0.5", "0.5"), ("1", "0", "0"), ("x", "1", "1")])
def test_shares_that_are_not_positive_numbers_are_refused_before_any_work(grouped_labels, sample_root, tmp_path,
                                                                          capsys, shares):  # fmt: skip
    from fracdet.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["split", str(sample_root), "--out", str(tmp_path / "s.csv"), "--fractions", *shares])
    assert stopped.value.code == 2 and "a share must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    labels, groups = grouped_labels
    with pytest.raises(ValueError, match="must be positive"):
        assign_splits(labels, groups, [float(s) if s != "x" else -1.0 for s in shares])


@pytest.mark.parametrize(("content", "words"), [
    (b"a,b\n1,2\n", "not a split manifest: it has no path"),  # another table passed by mistake
    (b"\x00\x01binary", "not a split manifest"),
    (b"", "No columns to parse"),
    (b"\xff\xfe\xfa\n", "can't decode"),
    (b"path,label,split\nimages/Fractured/IMG0000261.jpg,1,tset\n", "splits other than"),
])  # fmt: skip
def test_a_table_that_is_not_a_split_manifest_is_refused_by_name_before_any_work(sample_root, tmp_path, content,
                                                                                  words):  # fmt: skip
    """A KeyError deep in a merge before (`--splits` of evaluate, train and quantize; `split --repair`, there
    only after the duplicate search, minutes on a full dataset)."""
    from fracdet.cli import main

    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(content)
    with pytest.raises(SystemExit, match=re.escape(words)):
        main(["split", str(sample_root), "--repair", str(manifest), "--out", str(tmp_path / "s.csv")])
    assert not (tmp_path / "s.csv").exists()
    if "splits other than" not in words:  # there, evaluate finds no test rows, and says so
        with pytest.raises(SystemExit, match=re.escape(words)):
            main(["evaluate", "fracatlas-default", "--data", str(sample_root), "--splits", str(manifest),
                  "--split", "test", "--out", str(tmp_path / "eval")])  # fmt: skip
