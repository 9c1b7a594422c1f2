"""Scoring an archive on a Dask cluster: the rows of `fracdet predict`, in Parquet, resumable after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fracdet.cli import main

pytest.importorskip("distributed", reason='needs the archive extra: pip install "fracdet[archive]"')

from fracdet.inference.archive import ArchiveJobError, predict_archive, read_manifest

SAME = ["path", "label", "level", "error", "boxes", "warning"]


@pytest.fixture
def manifest(sample_root: Path, tmp_path: Path) -> Path:
    """Every file of the bundled sample (one of them truncated), one per line."""
    files = sorted(str(p) for p in (sample_root / "images").rglob("*.jpg"))
    path = tmp_path / "manifest.txt"
    path.write_text("# the bundled sample\n" + "\n".join(files) + "\n")
    return path


@pytest.fixture
def single_process(manifest: Path, tmp_path: Path, monkeypatch) -> pd.DataFrame:
    """What single-process `fracdet predict` writes for the same manifest."""
    monkeypatch.setenv("FRACDET_PROGRESS", "0")
    out = tmp_path / "single.csv"
    assert main(["predict", "--manifest", str(manifest), "--out", str(out)]) == 1  # one unreadable file
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


def same_rows(parquet: pd.DataFrame, csv: pd.DataFrame) -> None:
    assert len(parquet) == len(csv)
    for column in SAME:
        left = parquet[column].astype(object).where(parquet[column].notna(), None).tolist()
        right = csv[column].astype(object).where(csv[column].notna(), None).tolist()
        assert left == right, column
    np.testing.assert_allclose(parquet["probability"], csv["probability"], atol=2e-6)


def test_a_two_worker_cluster_writes_the_rows_of_fracdet_predict_and_a_rerun_redoes_nothing(
    manifest, single_process, tmp_path, monkeypatch
):
    monkeypatch.setenv("FRACDET_PROGRESS", "0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = tmp_path / "archive"
    sources = read_manifest(manifest)
    assert len(sources) == 42
    result = predict_archive("fracatlas-default", sources, out, workers=2, partition_size=8)
    assert (result.partitions, result.scored, result.kept, result.images) == (6, 6, 0, 42)
    rows = pd.read_parquet(out)
    same_rows(rows, single_process)
    assert rows["error"].notna().sum() == 1  # the truncated file is a row with its error, not a failed job
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = predict_archive("fracatlas-default", sources, out, workers=2, partition_size=8)
    assert (again.scored, again.kept) == (0, 6)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == written
    # the cluster's settings for its workers (one thread each) stay out of this process's environment
    assert "OMP_NUM_THREADS" not in os.environ
    with pytest.raises(ArchiveJobError, match="partition_size"):
        predict_archive("fracatlas-default", sources, out, partition_size=4)


def test_a_job_killed_midway_resumes_without_redoing_finished_partitions(manifest, single_process, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "fracdet", "predict", "--manifest", str(manifest), "--engine", "dask",
               "--out", str(out), "--workers", "2", "--partition-size", "4"]  # fmt: skip
    env = {**os.environ, "FRACDET_PROGRESS": "0"}
    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(job.pid, signal.SIGKILL)  # the client, the scheduler and the workers, mid-job
    job.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 2 <= len(finished) < 11, "the job was not stopped midway"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert f"{len(finished)} kept" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in finished} == finished
    same_rows(pd.read_parquet(out), single_process)
    assert not list(out.glob(".*.tmp")), "a half-written partition of the killed job was left behind"


def test_a_manifest_table_names_its_paths_in_a_path_column(tmp_path):
    pd.DataFrame({"path": ["a.png", "b.dcm"], "label": [0, 1]}).to_csv(tmp_path / "m.csv", index=False)
    assert read_manifest(tmp_path / "m.csv") == ["a.png", "b.dcm"]
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="'path' column"):
        read_manifest(tmp_path / "bad.csv")


def test_a_manifest_may_mix_files_and_urls_and_one_that_is_no_manifest_is_refused_by_name(sample_root, tmp_path,
                                                                                         monkeypatch):  # fmt: skip
    """Before, one URL in a manifest sent every entry to the DICOMweb reader, so its files failed as "not a
    DICOMweb instance URL"; a table without a 'path' column, an empty or non-UTF-8 file ended in tracebacks."""
    import http.server
    import threading
    from functools import partial

    monkeypatch.setenv("FRACDET_PROGRESS", "0")
    image = sample_root / "images" / "Fractured" / "IMG0000261.jpg"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))  # a web server: 404s
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web/studies/1.2/series/1.3/instances/1.4"
        (tmp_path / "mixed.txt").write_text(f"{image}\n{url}\n")
        try:
            code = main(["predict", "--manifest", str(tmp_path / "mixed.txt"), "--out", str(tmp_path / "rows.csv")])
        finally:
            server.shutdown()
    assert code == 1
    rows = pd.read_csv(tmp_path / "rows.csv", keep_default_na=False, na_values=[""]).set_index("path")
    assert rows.loc[str(image), "probability"] > 0 and pd.isna(rows.loc[str(image), "error"])
    assert rows.loc[url, "error"].startswith("DICOMweb retrieval failed")
    for name, content, words in [("table.csv", b"file,label\na.png,0\n", "needs a 'path' column"),
                                 ("empty.csv", b"", "No columns to parse"),
                                 ("latin.csv", b"\xff\xfe\n", "can't decode")]:  # fmt: skip
        (tmp_path / name).write_bytes(content)
        for engine in ("local", "dask"):
            with pytest.raises(SystemExit, match=f"--manifest .*{name}: .*{words}"):
                main(["predict", "--manifest", str(tmp_path / name), "--engine", engine, "--out", str(tmp_path / "o")])
