"""Where the server's inference runs: a bounded queue in front of a fixed number of worker threads.

Why not FastAPI's thread pool: a request that times out there leaves its thread running and holding the
model, so three slow uploads could make every later request time out too, and waiting uploads held the
threads the health check needed. Here:

* at most ``workers`` predictions run at once, so memory is bounded by the decoder's pixel limit times
  ``workers`` (waiting requests hold only their spooled upload, on disk beyond 1 MiB);
* at most ``queue_size`` requests wait; beyond that :class:`ServerBusyError` (the server answers 503 with
  ``Retry-After``) rather than an ever-growing backlog;
* a caller that gives up (a timeout, a closed connection) cancels its job: one still waiting is dropped
  when its turn comes, without running; one already running is told through its ``cancel`` event and
  stops at the next stage boundary (:class:`fracdet.inference.Cancelled`); its result is never kept;
* nothing else (health, model information, the page) ever waits for a worker.

The job is a plain callable taking a ``cancel`` :class:`threading.Event`, so a faster back end (ONNX
Runtime, a batching scheduler) can replace what runs inside without changing these guarantees.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["InferenceExecutor", "ServerBusyError"]

T = TypeVar("T")


class ServerBusyError(RuntimeError):
    """The waiting queue is full: try again in ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy: every inference slot is taken; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class _Job:
    fn: Callable[[threading.Event], Any]
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)


class InferenceExecutor:
    """Run jobs on ``workers`` threads behind a queue of at most ``queue_size`` waiting jobs.

    Use as a context manager (or call :meth:`close`): the threads stop when the block ends.

    Args:
        workers: jobs running at once.
        queue_size: jobs waiting at most; :meth:`run` raises :class:`ServerBusyError` beyond it.
        retry_after_s: what :class:`ServerBusyError` advises.
    """

    def __init__(self, workers: int = 1, queue_size: int = 64, *, retry_after_s: int = 2) -> None:
        if workers < 1 or queue_size < 1:
            raise ValueError(f"need at least one worker and one queue slot, not {workers} and {queue_size}")
        self.workers, self.queue_size, self.retry_after_s = workers, queue_size, retry_after_s
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._running: set[_Job] = set()
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0, "refused": 0}
        self._threads: list[threading.Thread] = []
        try:
            for k in range(workers):
                thread = threading.Thread(target=self._work, name=f"fracdet-inference-{k}", daemon=True)
                thread.start()
                self._threads.append(thread)
        except RuntimeError:  # the system refused a thread: end those started rather than leave them waiting
            self.close()
            raise

    def __enter__(self) -> InferenceExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, fn: Callable[[threading.Event], T]) -> tuple[Future, threading.Event]:
        """Queue ``fn(cancel)``; returns its future and the event that cancels it. Raises :class:`ServerBusyError`."""
        job = _Job(fn)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._counts["refused"] += 1
            raise ServerBusyError(self.retry_after_s) from None
        return job.future, job.cancel

    async def run(self, fn: Callable[[threading.Event], T], *, timeout: float) -> T:
        """Await ``fn(cancel)`` for at most ``timeout`` seconds, queueing included; cancelled on timeout.

        Raises:
            ServerBusyError: the queue is full.
            TimeoutError: it took longer (the job is cancelled, as it is when the caller is cancelled).
        """
        future, cancel = self.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except BaseException:  # a timeout, or the request itself cancelled (client gone)
            cancel.set()
            raise

    def stats(self) -> dict[str, int]:
        """Jobs waiting and running now, and how many completed, failed, were cancelled or refused so far."""
        with self._lock:
            return {"workers": self.workers, "queue_size": self.queue_size, "waiting": self._queue.qsize(),
                    "running": len(self._running), **self._counts}  # fmt: skip

    def close(self) -> None:
        """Cancel waiting jobs, let running ones stop, and end the threads."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.future.cancel()
        with self._lock:
            for job in self._running:
                job.cancel.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancel.is_set() or not job.future.set_running_or_notify_cancel():
                self._count("cancelled")  # given up while waiting: never started, holds nothing
                continue
            try:
                with self._lock:
                    self._running.add(job)
                result = job.fn(job.cancel)
            except BaseException as exc:  # delivered to the caller, never lost; the worker lives on
                self._count("cancelled" if job.cancel.is_set() else "failed")
                job.future.set_exception(exc)
            else:
                if job.cancel.is_set():  # finished after its caller left: the result is dropped
                    self._count("cancelled")
                    job.future.set_exception(TimeoutError("the caller gave up"))
                else:
                    self._count("completed")
                    job.future.set_result(result)
            finally:
                with self._lock:
                    self._running.discard(job)
                job = None  # drop the job (and what its closure holds) before waiting again

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1
