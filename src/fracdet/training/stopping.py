"""Stopping a training run between batches when a signal asks, with nothing it learnt lost.

A sitting on a shared machine ends with SIGTERM (a scheduler, ``timeout``, a session closing, someone making
room for the tests) or with Ctrl-C. Killed at once, a run loses what it trained since its last checkpoint: up
to ``checkpoint_minutes``, and an epoch of the fused recipe on two CPU cores takes an hour. Asked instead,
:func:`fracdet.training.train` finishes the batch in hand, saves where it is (``partial.pt`` within an
epoch; between epochs ``last.pt`` already holds it) and returns; ``--resume`` goes on from there to the
weights of a run never stopped. Asked after the last epoch's batches (during its validation), it stops
before the model is written, which ``--resume`` then writes; asked while the model is being written (the
fit on validation, minutes at most), it finishes the model and then reports the stop (``fracdet train``
exits 128 + the signal either way, so a script that asked goes no further). A second signal acts as it
would have without this module (Ctrl-C raises ``KeyboardInterrupt``, SIGTERM ends the process), for when
waiting is not wanted; the model is written atomically, so that costs the step under way only.

The loading processes (:class:`fracdet.training.augment.EpochLoader`) ignore both signals, which reach them
too when a process group or a command line is signalled: the training process ends them itself.

Training on several processes keeps the signals' defaults: one process stopping alone would leave the others
waiting for it in their next gradient exchange.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StopRequest", "stop_on_signals"]


class StopRequest:
    """Whether a stop was asked, and by which signal. Set from a signal handler, read by the training loop."""

    def __init__(self) -> None:
        self._asked = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._asked.set()

    def is_set(self) -> bool:
        return self._asked.is_set()

    @property
    def name(self) -> str:
        """The asking signal's name (``SIGTERM``), or ``asked`` when no signal asked."""
        return signal.Signals(self.signum).name if self.signum is not None else "asked"


@contextmanager
def stop_on_signals(*signums: int) -> Iterator[StopRequest]:
    """Within the block, the first of ``signums`` (default SIGTERM and SIGINT) sets the yielded
    :class:`StopRequest` instead of ending the process; any later one acts as the handler before the block
    did. The handlers before the block are back when it ends. Call it from the main thread (Python runs
    signal handlers there only)."""
    signums = signums or (signal.SIGTERM, signal.SIGINT)
    request = StopRequest()
    before = {signum: signal.getsignal(signum) for signum in signums}

    def ask(signum: int, frame: object) -> None:
        request.set(signum)
        for each, handler in before.items():  # the next one is not waited for
            signal.signal(each, handler)

    try:
        for signum in signums:
            signal.signal(signum, ask)
        yield request
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
