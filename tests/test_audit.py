"""The audit on the bundled sample finds the defects it was picked for."""

from __future__ import annotations

import json

import pytest

from fracdet.cli import main
from fracdet.data import DuplicateConfig, audit_dataset, load_dataset, report_text


@pytest.fixture(scope="module")
def report(cache_dir):
    from .conftest import SAMPLE

    return audit_dataset(load_dataset(SAMPLE), config=DuplicateConfig(cache_dir=str(cache_dir)))


def test_truncated_and_duplicates(report):
    assert report.truncated == ["images/Non_fractured/IMG0004028.jpg"]
    assert report.unreadable.empty
    assert report.exact_groups == [
        ["images/Fractured/IMG0000261.jpg", "images/Fractured/IMG0002299.jpg"],
        ["images/Non_fractured/IMG0000003.jpg", "images/Non_fractured/IMG0000005.jpg"],
    ]
    assert report.n_distinct_contents == 40


def test_label_conflicts_from_metadata_and_from_a_truncated_copy(report):
    kinds = {row.kind: row.paths for row in report.label_conflicts.itertuples()}
    assert kinds["metadata"] == ["images/Fractured/IMG0003298.jpg"]
    assert kinds["near"] == ["images/Fractured/IMG0002617.jpg", "images/Non_fractured/IMG0004028.jpg"]
    assert report.has_conflicts and not report.has_leakage


def test_the_leakage_of_another_split_is_what_auditing_that_split_finds(report, cache_dir):
    from .conftest import SAMPLE

    copies = ["images/Fractured/IMG0000261.jpg", "images/Fractured/IMG0002299.jpg"]  # one exact group
    manifest = report.files[["path"]].assign(split="train")
    manifest.loc[manifest["path"] == copies[1], "split"] = "test"
    leakage, leaked = report.leakage_of(manifest)
    assert sorted(leaked["path"]) == copies and set(leaked["kind"]) == {"exact"}
    table = load_dataset(SAMPLE).drop(columns="split").merge(manifest, on="path")
    table.attrs.update(load_dataset(SAMPLE).attrs)
    again = audit_dataset(table, config=DuplicateConfig(cache_dir=str(cache_dir)))
    assert again.leaked_files.equals(leaked) and again.leakage.equals(leakage)


def test_text_report_names_the_findings(report):
    text = report_text(report)
    assert "Truncated files (a strict decoder raises): 1" in text
    assert "IMG0003298" in text and "LABEL CONFLICTS" in text


def test_cli_writes_json_and_html_and_strict_fails(sample_root, cache_dir, tmp_path, capsys):
    args = ["audit", str(sample_root), "--cache-dir", str(cache_dir), "--json", str(tmp_path / "a.json")]
    assert main([*args, "--html", str(tmp_path / "a.html")]) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["truncated"] == ["images/Non_fractured/IMG0004028.jpg"] and data["has_conflicts"]
    page = (tmp_path / "a.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.split("<body>")[0]
    assert main([*args, "--strict"]) == 3


def test_cli_split_then_audit_the_manifest(sample_root, cache_dir, tmp_path, capsys):
    out = tmp_path / "splits.csv"
    assert main(["split", str(sample_root), "--out", str(out), "--cache-dir", str(cache_dir), "--seed", "1"]) == 0
    assert "left out 1 files" in capsys.readouterr().out
    assert main(["audit", str(sample_root), "--splits", str(out), "--cache-dir", str(cache_dir)]) == 0
    assert "none: no copy of a file is in another split" in capsys.readouterr().out


def test_cli_reports_a_bad_path_without_a_traceback(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "dataset not found" in capsys.readouterr().err
