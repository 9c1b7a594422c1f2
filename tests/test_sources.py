"""load_dataset recognises the layout by itself and returns one sample table."""

from __future__ import annotations

import shutil

import pytest

from fracdet.data import DatasetLayoutError, load_dataset, summary
from fracdet.data.sources import fracture_size


def _copy(sample_root, names, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        folder = "Fractured" if (sample_root / "images" / "Fractured" / name).exists() else "Non_fractured"
        shutil.copy(sample_root / "images" / folder / name, dst / name)


def test_fracatlas_layout_with_metadata_and_boxes(sample_root):
    table = load_dataset(sample_root)
    assert table.attrs["layout"] == "fracatlas"
    assert len(table) == 42 and set(table["label"]) == {0, 1}
    assert (table["label"] == 1).sum() == 18
    row = table.set_index("path").loc["images/Fractured/IMG0003298.jpg"]
    assert row["label"] == 1 and row["metadata_label"] == 0 and row["label_disagrees_with_metadata"]
    boxed = table[table["boxes"].map(len) > 0]
    assert len(boxed) > 0 and (boxed["label"] == 1).all()
    assert all(0 <= v <= 1 for boxes in boxed["boxes"] for box in boxes for v in box)
    assert table["region"].notna().all() and table["view"].notna().any()
    assert boxed["fracture_size"].notna().all() and table.loc[table["label"] == 0, "fracture_size"].isna().all()


def test_fracture_size_is_the_largest_box_side_as_a_share_of_the_image():
    assert fracture_size([]) is None
    assert fracture_size([[0.1, 0.1, 0.14, 0.14]]).startswith("small")  # 4% of the side
    assert fracture_size([[0.1, 0.1, 0.14, 0.14], [0.5, 0.5, 0.56, 0.56]]).startswith("medium")  # largest wins
    assert fracture_size([[0.0, 0.0, 0.05, 0.05]]).startswith("medium")  # 5% is the first medium side
    assert fracture_size([[0.2, 0.2, 0.3, 0.4]]).startswith("large")  # sqrt(0.1 * 0.2) = 14%


@pytest.mark.parametrize(
    ("positive", "negative"),
    [
        ("fractured", "not fractured"),
        ("Fracture", "No_Fracture"),
        ("ABNORMAL", "normal"),
        ("positive", "negative"),
    ],
)
def test_image_folders_with_any_common_class_names(tmp_path, sample_root, positive, negative):
    _copy(sample_root, ["IMG0000261.jpg"], tmp_path / "train" / positive)
    _copy(sample_root, ["IMG0000003.jpg"], tmp_path / "val" / negative)
    table = load_dataset(tmp_path)
    assert table.attrs["layout"] == "image-folders"
    assert dict(zip(table["split"], table["label"], strict=True)) == {"train": 1, "val": 0}


def test_image_folders_without_splits(tmp_path, sample_root):
    _copy(sample_root, ["IMG0000261.jpg"], tmp_path / "fracture")
    _copy(sample_root, ["IMG0000003.jpg"], tmp_path / "normal")
    table = load_dataset(tmp_path)
    assert table["split"].isna().all()
    assert summary(table).loc["total", "total"] == 2


def test_unknown_class_name_says_what_was_expected(tmp_path, sample_root):
    _copy(sample_root, ["IMG0000261.jpg"], tmp_path / "maybe_broken")
    with pytest.raises(DatasetLayoutError, match=r"unknown class folder 'maybe_broken'.*expected one of"):
        load_dataset(tmp_path)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="no images found"):
        load_dataset(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nowhere")


def test_mura_tree_gives_patients_studies_and_study_labels(tmp_path, sample_root):
    root = tmp_path / "MURA-v1.1"
    _copy(sample_root, ["IMG0000261.jpg"], root / "train" / "XR_WRIST" / "patient00001" / "study1_positive")
    _copy(
        sample_root,
        ["IMG0000003.jpg", "IMG0000005.jpg"],
        root / "valid" / "XR_HAND" / "patient00002" / "study2_negative",
    )
    table = load_dataset(root)
    assert table.attrs["layout"] == "mura"
    assert table["label"].tolist() == [1, 0, 0]
    assert table["split"].tolist() == ["train", "val", "val"]
    assert table["patient_id"].tolist() == ["patient00001", "patient00002", "patient00002"]
    assert table["study_id"].iloc[1] == "patient00002/study2"
    assert table["group"].iloc[1] == table["group"].iloc[2] != table["group"].iloc[0]
    assert table["region"].tolist() == ["wrist", "hand", "hand"]


def test_csv_manifest_relative_to_a_data_root(tmp_path, sample_root):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label,group,split\nimages/Fractured/IMG0000261.jpg,1,a,train\nimages/Non_fractured/IMG0000003.jpg,0,b,test\n"
    )
    table = load_dataset(manifest, data_root=sample_root)
    assert table.attrs["layout"] == "manifest"
    assert table["split"].tolist() == ["train", "test"] and table["group"].tolist() == ["a", "b"]


def test_csv_manifest_with_missing_files_names_them(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nnot/there.jpg,1\n")
    with pytest.raises(DatasetLayoutError, match=r"not/there\.jpg"):
        load_dataset(manifest)


def test_csv_manifest_with_bad_labels(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nx.jpg,maybe\n")
    with pytest.raises(DatasetLayoutError, match="label must be 0 or 1"):
        load_dataset(manifest)
