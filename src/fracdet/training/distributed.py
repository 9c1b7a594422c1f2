"""Training on several devices and machines with PyTorch's own engine: ``torchrun`` and DDP.

``fracdet train --devices N --nodes M`` starts ``N`` processes per machine through ``torchrun``
(:func:`launch`); each runs the same :func:`fracdet.training.train` inside :func:`process_group`, which
joins the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs) and leaves it
when the block ends. What a run does with :class:`Ranks`:

* every rank draws the same epoch order and cuts the same *global* batches of ``batch_size``; rank ``r``
  takes items ``r, r + W, ...`` of each (:meth:`Ranks.shard`), so the recipe's batch size, schedule and
  augmentation (seeded per image and position, :mod:`fracdet.training.augment`) are those of one process;
* DDP averages the gradients; on GPUs batch norm is synchronised (``SyncBatchNorm``), on CPUs each rank
  normalises over its own part of the batch (PyTorch synchronises batch norm only on GPUs);
* losses and accuracies are summed over ranks, validation images are shared out and their margins
  gathered (:meth:`Ranks.gather`), so every rank takes the same decisions (best epoch, early stopping);
* only rank 0 writes the run folder; checkpoints hold the plain module's weights, so a run resumes on
  another number of devices (or on one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Ranks", "current_ranks", "launch", "launched", "process_group"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's part of ``items`` (every ``world``-th, from ``rank``)."""
        return list(items[self.rank :: self.world])

    def sum(self, *values: float) -> list[float]:
        """Each value summed over ranks."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()

    def gather(self, part: np.ndarray, total: int) -> np.ndarray:
        """The whole ``(total, ...)`` array from every rank's :meth:`shard` of it, in the original order."""
        if not self.distributed:
            return part
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part)
        whole = np.empty((total, *part.shape[1:]), part.dtype)
        for rank, values in enumerate(parts):
            whole[rank :: self.world] = values
        return whole

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (batch-norm statistics), so all score alike."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


@contextmanager
def process_group(timeout_minutes: float = 60.0) -> Iterator[Ranks]:
    """Join the process group that ``torchrun`` describes in the environment, for the ``with`` block.

    Outside ``torchrun`` (or with one process) nothing is joined and the block gets ``Ranks()``. On GPUs each
    process takes the GPU of its local rank and talks NCCL; on CPUs gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield current_ranks()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    progress = os.environ.get("FRACDET_PROGRESS")
    ranks = current_ranks()
    if not ranks.main:
        os.environ["FRACDET_PROGRESS"] = "0"  # one progress bar, rank 0's
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
        if progress is None:
            os.environ.pop("FRACDET_PROGRESS", None)
        else:
            os.environ["FRACDET_PROGRESS"] = progress


def current_ranks() -> Ranks:
    """The process group this process is in, or ``Ranks()`` (one process) when it is in none."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launch(argv: Sequence[str], *, devices: int, nodes: int = 1, rendezvous: str | None = None,
           job: str | None = None) -> int:  # fmt: skip
    """Run ``fracdet ARGV`` in ``devices`` processes on each of ``nodes`` machines through ``torchrun``.

    One machine: a standalone rendezvous on a free local port. Several: run the same command on every
    machine with the same ``rendezvous`` (``HOST:PORT`` of one of them; c10d) and ``job`` (default: SLURM's
    job id, else ``fracdet``); torchrun numbers the machines as they join. Returns the exit status
    (non-zero when any process failed).

    The started processes see ``WORLD_SIZE`` (:func:`launched`), so the same command line does not launch
    again there. On CPUs each process gets ``cores / devices`` threads (``OMP_NUM_THREADS``) unless set.
    """
    from torch.distributed.run import get_args_parser, run

    if nodes > 1 and not rendezvous:
        raise ValueError("training on several machines needs --rendezvous HOST:PORT (one machine's address)")
    options = [f"--nproc-per-node={devices}", f"--nnodes={nodes}"]
    if nodes > 1:
        job = job or os.environ.get("SLURM_JOB_ID", "fracdet")
        options += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}", f"--rdzv-id={job}"]
    else:
        options.append("--standalone")
    env_threads = "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available()
    if env_threads:
        from fracdet.utils.workers import worker_count

        os.environ["OMP_NUM_THREADS"] = str(max(1, worker_count() // devices))
    command = [*options, "--module", "fracdet", *argv]
    try:
        run(get_args_parser().parse_args(command))
    except Exception as exc:  # torchrun's ChildFailedError: it has printed each failed process's error
        print(f"error: distributed training failed: {type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        if env_threads:
            del os.environ["OMP_NUM_THREADS"]
    return 0
