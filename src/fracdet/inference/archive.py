"""Screening an archive: a manifest of millions of radiographs scored on a Dask cluster into Parquet.

The engine is Dask (``dask.distributed``), chosen over Ray Data for what this job needs and no more: the
work is a list of independent partitions, each scored by a model that a worker process loads once; Dask
runs that on a laptop (a local cluster of processes), on SLURM/PBS (``dask-jobqueue``) and on Kubernetes
(``dask-kubernetes``) with the same code, is pure Python (about 10 MB installed against Ray's hundreds),
and starts a local cluster in seconds on two cores, which keeps its test in CI. Ray's actor pools and
object store pay off for GPU pipelines that stream tensors between stages; here each partition goes from
paths to rows in one process, and nothing large travels between machines but the rows.

The output folder, one file per partition of the manifest, each written whole or not at all::

    _job.json            what the rows depend on: the manifest (hash, length), partition size, model
    part-00000.parquet   rows of manifest entries 0 .. size - 1, the columns of ``fracdet predict``'s CSV
    part-00001.parquet   ...

A job interrupted at any point (a worker or the whole cluster killed) is started again with the same
command: finished partitions are kept, the rest are scored. The same folder refuses another manifest,
partition size or model, which would mix rows of two jobs. Read the result with
``pandas.read_parquet(folder)`` (or Spark, DuckDB, Polars; they skip ``_job.json``): the ``part-*.parquet``
files are its rows in manifest order, with one schema
(:data:`fracdet.inference.predictor.ROW_COLUMNS`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fracdet.inference.predictor import ROW_COLUMNS
from fracdet.utils.atomic import atomic_write_bytes, write_json
from fracdet.utils.progress import progress_bar

__all__ = ["ArchiveJobError", "ArchiveResult", "predict_archive", "read_manifest"]

#: What the ``archive`` extra brings, for the error when it is missing.
INSTALL_HINT = 'scoring an archive needs Dask and pyarrow: pip install "fracdet[archive]"'


class ArchiveJobError(ValueError):
    """The output folder holds another job's rows (another manifest, partition size or model)."""


@dataclass
class ArchiveResult:
    """What :func:`predict_archive` did (the rows are in ``out_dir``)."""

    out_dir: Path
    partitions: int  #: partitions of the manifest
    scored: int  #: partitions scored by this call
    kept: int  #: partitions already finished before it, kept
    images: int  #: manifest entries scored by this call
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def read_manifest(path: str | Path) -> list[str]:
    """Paths or URLs to score: a text file (one per line), or a CSV or Parquet file with a ``path`` column."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".parquet"):
        table = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
        if "path" not in table:
            columns = ", ".join(repr(str(c)[:40]) for c in table.columns[:8])
            raise ValueError(f"{path}: a manifest table needs a 'path' column (it has {columns})")
        return table["path"].astype(str).tolist()
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def predict_archive(
    model: str,
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    scheduler: str | None = None,
    workers: int = 2,
    partition_size: int = 256,
    backend: str = "auto",
    threads: int = 1,
    reader: Callable[[str], bytes] | None = None,
) -> ArchiveResult:
    """Score ``sources`` with ``model`` on a Dask cluster, one Parquet file per partition in ``out_dir``.

    Args:
        model: a release name or model folder every worker can load (:func:`fracdet.models.load`).
        sources: file paths (or, with ``reader``, URLs), in manifest order.
        scheduler: address of a running Dask scheduler (``tcp://host:8786``); ``None``: a local cluster of
            ``workers`` processes for this call.
        partition_size: manifest entries per partition (the unit of work and of resumption).
        backend, threads: the scorer's back end and threads per worker (:class:`fracdet.inference.Predictor`).
        reader: fetches what is not a local file (picklable: it runs on the workers), e.g.
            :func:`fracdet.dicom.pull.read_instance` for DICOMweb URLs.

    A progress bar counts the images scored (rate, ETA; ``FRACDET_PROGRESS=0`` switches it off).
    """
    if workers < 1 or partition_size < 1:  # a cluster of no workers waited for ever
        raise ValueError(f"workers and partition_size must be 1 or more, not {workers} and {partition_size}")
    try:
        from distributed import as_completed
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    from fracdet.models import load

    out_dir = Path(out_dir)
    started = time.perf_counter()
    description = _job(load(model), sources, partition_size)
    _claim(out_dir, description)
    for stale in out_dir.glob(".part-*.tmp"):  # half-written by a job that was killed
        stale.unlink(missing_ok=True)
    chunks = [list(sources[i : i + partition_size]) for i in range(0, len(sources), partition_size)]
    todo = [k for k in range(len(chunks)) if not _part(out_dir, k).is_file()]
    scored_images = sum(len(chunks[k]) for k in todo)
    if todo:
        with _cluster(scheduler, workers) as client:
            futures = [client.submit(_score_partition, k, chunks[k], model=model, out_dir=str(out_dir),
                                     backend=backend, threads=threads, reader=reader, key=f"fracdet-part-{k}",
                                     pure=False)
                       for k in todo]  # fmt: skip
            with progress_bar(desc="scoring archive", total=scored_images) as bar:
                for future in as_completed(futures):
                    bar.update(future.result())
    return ArchiveResult(out_dir, len(chunks), len(todo), len(chunks) - len(todo), scored_images,
                         time.perf_counter() - started)  # fmt: skip


def _job(model: Any, sources: Sequence[str], partition_size: int) -> dict[str, Any]:
    """What the rows of a job depend on (``_job.json``)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.encode() + b"\n")
    return {
        "manifest_sha256": digest.hexdigest(),
        "entries": len(sources),
        "partition_size": partition_size,
        "model": {"name": model.name, "version": model.meta.get("version"), "arch": model.arch},
    }


def _claim(out_dir: Path, description: dict[str, Any]) -> None:
    """Write ``_job.json``, or check that the folder's job is this one."""
    path = out_dir / "_job.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != description:
            changed = ", ".join(k for k in description if before.get(k) != description[k])
            raise ArchiveJobError(f"{out_dir} holds another job's rows ({changed} differ): choose another folder")
        return
    write_json(path, description)


def _part(out_dir: Path, k: int) -> Path:
    return out_dir / f"part-{k:05d}.parquet"


@contextmanager
def _cluster(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A client of the given scheduler, or of a local cluster of ``workers`` single-threaded processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    environ = dict(os.environ)
    try:
        with (
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            yield client
    finally:  # Dask's nannies set OMP_NUM_THREADS=1 (and more) in this process too, for whatever it starts next
        os.environ.clear()
        os.environ.update(environ)


_predictors: dict[tuple[str, str, int], Any] = {}
_predictors_lock = threading.Lock()


def _predictor(model: str, backend: str, threads: int) -> Any:
    """The worker process's predictor for ``model``, loaded once (a worker scores many partitions)."""
    from fracdet.inference.predictor import Predictor
    from fracdet.models import load

    key = (model, backend, threads)
    with _predictors_lock:
        if key not in _predictors:
            _predictors[key] = Predictor(load(model), heatmaps=False, backend=backend, threads=threads)
        return _predictors[key]


def _score_partition(
    k: int,
    sources: list[str],
    *,
    model: str,
    out_dir: str,
    backend: str,
    threads: int,
    reader: Callable[[str], bytes] | None,
) -> int:
    """Score one partition on a worker and write its Parquet file whole; returns how many entries it held."""
    os.environ["FRACDET_PROGRESS"] = "0"  # the client shows the job's progress
    predictor = _predictor(model, backend, threads)
    table = predictor.predict_files(sources, decoders=threads, reader=reader)
    buffer = io.BytesIO()
    table.astype(ROW_COLUMNS).to_parquet(buffer, index=False)
    atomic_write_bytes(_part(Path(out_dir), k), buffer.getvalue())
    return len(sources)
