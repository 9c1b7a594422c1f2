"""The audit and the splitter on the full shared datasets find what their READMEs document.

These need ``$FRACDET_SHARED/data`` (skipped without it; a failure under ``CI=true``). The multiregion audit and
FracAtlas's files, hashes and confounders take a few minutes from a cold cache on two cores and run in ``make
test``. The near-duplicate searches over all of FracAtlas, within it and against multiregion, take about 20
minutes more (some 35,000 and 26,000 candidate pairs checked, nearly all different radiographs, each
geometrically):
like the benchmarks, they are kept out of ``make test`` (marker ``full``) and run with ``pytest -m full``.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from fracdet.data import DuplicateConfig, audit_dataset, load_dataset, make_splits
from fracdet.data.confounders import CONTROL
from fracdet.data.duplicates import cross_dataset_matches

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def config(cache_dir):
    return DuplicateConfig(cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def fracatlas(shared_data):
    return load_dataset(shared_data / "fracatlas")


@pytest.fixture(scope="module")
def multiregion(shared_data):
    return load_dataset(shared_data / "multiregion")


@pytest.fixture(scope="module")
def fracatlas_files(fracatlas, config):
    """FracAtlas audited without the near-duplicate search: files, hashes, byte-identical groups, confounders."""
    return audit_dataset(fracatlas, config=replace(config, near_duplicates=False))


@pytest.fixture(scope="module")
def fracatlas_report(fracatlas, config):
    return audit_dataset(fracatlas, config=config)


@pytest.fixture(scope="module")
def multiregion_report(multiregion, config):
    return audit_dataset(multiregion, config=config)


@pytest.fixture(scope="module")
def multiregion_against_fracatlas(multiregion, fracatlas, config):
    return audit_dataset(multiregion, against=fracatlas, config=config)


def test_fracatlas_truncated_files(fracatlas_files):
    truncated = fracatlas_files.truncated
    assert len(truncated) == 59
    assert all(p.startswith("images/Non_fractured/") for p in truncated)
    numbers = [int(re.search(r"IMG(\d+)", p).group(1)) for p in truncated]
    assert min(numbers) == 4028 and max(numbers) == 4347


def test_fracatlas_exact_duplicate_groups(fracatlas_files):
    groups = fracatlas_files.exact_groups
    assert len(groups) == 12 and sum(map(len, groups)) == 27
    assert [
        "images/Non_fractured/IMG0000003.jpg",
        "images/Non_fractured/IMG0000005.jpg",
        "images/Non_fractured/IMG0002291.jpg",
        "images/Non_fractured/IMG0002293.jpg",
    ] in groups


def test_fracatlas_label_disagrees_with_its_metadata_once(fracatlas_files):
    conflicts = fracatlas_files.label_conflicts
    metadata = conflicts[conflicts["kind"] == "metadata"]
    assert metadata["paths"].tolist() == [["images/Fractured/IMG0003298.jpg"]]


@pytest.mark.full
def test_fracatlas_late_negatives_are_copies_of_fractures(fracatlas_report):
    conflicts = fracatlas_report.label_conflicts
    # The last non-fractured files (IMG0004028-IMG0004347, where the truncated ones are) hold copies of
    # fractured radiographs: one radiograph, both labels.
    near = conflicts[conflicts["kind"] == "near"]
    late_negative = re.compile(r"Non_fractured/IMG000(40[2-9]|4[1-3]\d)\d\.jpg")
    copies_of_fractures = [paths for paths in near["paths"] if any(late_negative.search(p) for p in paths)]
    assert len(copies_of_fractures) >= 10
    assert all(any(p.startswith("images/Fractured/") for p in paths) for paths in copies_of_fractures)


def test_fracatlas_confounders(fracatlas_files):
    table = fracatlas_files.confounders.set_index("property")
    truncated = table.loc["truncated"]
    assert truncated["flagged"] and truncated["auc"] > 0.5  # truncation predicts "no fracture"
    assert table.loc["width", "flagged"]  # fractured images are larger more often
    assert not table.loc[CONTROL, "flagged"]


def test_multiregion_published_split_leaks(multiregion_report):
    leak = multiregion_report.leakage.set_index(["split", "other"])
    assert (leak.loc[("test", "train"), "files"], leak.loc[("test", "train"), "exact_copies_in_other"]) == (506, 491)
    assert (leak.loc[("val", "train"), "files"], leak.loc[("val", "train"), "exact_copies_in_other"]) == (828, 728)
    assert leak.loc[("test", "train"), "near_copies_in_other"] > 491
    assert multiregion_report.has_leakage


def test_multiregion_is_few_hundred_radiographs(multiregion_report):
    assert multiregion_report.n_distinct_contents == 3866
    assert len(multiregion_report.truncated) == 18
    distinct = multiregion_report.n_distinct_radiographs
    assert 300 < distinct < 1500  # "most images are small-angle rotations of a few hundred originals"
    assert len(multiregion_report.largest_group) >= 50


def test_multiregion_holds_byte_identical_fracatlas_files(multiregion_report, fracatlas_files, config):
    ours, theirs = multiregion_report.duplicates, fracatlas_files.duplicates
    shared = cross_dataset_matches(ours, theirs, replace(config, near_duplicates=False))
    assert (shared["kind"] == "exact").all()
    assert ours.files["exact_group"].isin(shared["i"]).sum() == 18  # files identical after both were downscaled


@pytest.mark.full
def test_multiregion_contains_fracatlas(multiregion_against_fracatlas):
    shared = multiregion_against_fracatlas.against
    exact = shared[shared["kind"] == "exact"]
    assert len(exact) == 18  # byte-identical after the downscaling of both copies (README)
    assert len(shared) >= 135  # the published files had 135 byte-identical copies
    assert shared["other_path"].str.startswith("images/").all()


@pytest.mark.full
def test_honest_fracatlas_split(fracatlas, fracatlas_report):
    result = make_splits(fracatlas, seed=0, duplicates=fracatlas_report.duplicates)
    assert len(result.excluded) == 59 and set(result.excluded["reason"]) == {"truncated"}
    fractions = result.class_fractions()
    whole = fractions.loc["all", "fracture_fraction"]
    for split in ("train", "val", "test"):
        assert abs(fractions.loc[split, "fracture_fraction"] - whole) <= 0.02
    leakage, leaked = fracatlas_report.leakage_of(result.manifest)
    assert leaked.empty and leakage["near_copies_in_other"].sum() == 0


def test_honest_multiregion_split(multiregion, multiregion_report):
    result = make_splits(multiregion, seed=0, duplicates=multiregion_report.duplicates)
    manifest = result.manifest
    assert manifest.groupby("group")["split"].nunique().max() == 1
    fractions = result.class_fractions()
    for split in ("train", "val", "test"):
        assert abs(fractions.loc[split, "fracture_fraction"] - fractions.loc["all", "fracture_fraction"]) <= 0.02
    leakage, leaked = multiregion_report.leakage_of(manifest)
    assert leaked.empty and set(leakage["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("name", [pytest.param("fracatlas", marks=pytest.mark.full), "multiregion"])
def test_the_committed_repaired_manifests_have_no_leakage_by_todays_audit(name, request):
    import pandas as pd

    from .conftest import REPO

    report = request.getfixturevalue(f"{name}_report")
    old = pd.read_csv(REPO / "splits" / f"{name}_seed0.csv")
    repaired = pd.read_csv(REPO / "splits" / f"{name}_seed0_repaired.csv", keep_default_na=False)
    leakage, leaked = report.leakage_of(repaired)
    assert leaked.empty and leakage["near_copies_in_other"].sum() == 0
    # Only held-out files moved, towards train: a model trained on the old manifest is tested honestly.
    assert set(repaired.loc[repaired["split"] == "test", "path"]) <= set(old.loc[old["split"] == "test", "path"])
    assert set(repaired["path"]) == set(old["path"])
