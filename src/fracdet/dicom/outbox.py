"""Results waiting for their destination: kept on disk until the PACS has them, tried again while it is away.

A PACS restarts, is patched at night, loses its network for a minute. Before this module the node sent each
radiograph's results once, right after analysing it, and quarantined the radiograph when the destination did
not answer: the results were never delivered, and no clinician saw them unless someone sent the image again.
Now the node writes the three result objects into ``SPOOL/outbox/NAME/`` (atomically: written in a
temporary folder, then renamed) and :class:`Outbox` delivers them, oldest first:

* a delivery that fails for a reason that may pass (no connection, an association not accepted, a timeout,
  *Out of Resources*, HTTP 5xx, 408 or 429) stops the round: the destination is away, so the other entries
  are not tried either. The next round waits ``retry_s``, doubling up to thirty times that, and each failed
  round is logged once. While it waits, analysis goes on and its results join the queue on disk.
* a delivery the destination refuses for the objects themselves (a DIMSE failure status other than *Out of
  Resources*, HTTP 4xx, a STOW-RS answer listing objects not stored for such a reason) will not pass: that
  entry is quarantined with its reason, and the round goes on.
* an entry still undelivered ``give_up_s`` after it was written is quarantined, with the reason.

An entry is deleted only when all of its objects were delivered; one sent again keeps its UIDs, so a PACS
stores it once. Entries left by a stop or a crash are delivered at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fracdet.dicom.dicomweb import ANSWER_TIMEOUT_S, DicomWeb, check_url, failure, refused_by_stow
from fracdet.utils.atomic import atomic_write_text

__all__ = ["SUCCESS", "DeliveryError", "Outbox", "Sender", "c_store", "stow_rs"]

log = logging.getLogger(__name__)

#: C-STORE status: stored.
SUCCESS = 0x0000
#: The longest wait between rounds, in multiples of the first.
_MAX_BACKOFF = 30
_TEMPORARY = ".writing-"


class DeliveryError(ConnectionError):
    """The destination did not take a set of results; ``transient`` says whether trying again may help.

    The message names the destination's AE title or the HTTP status, never a URL or an identifier.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


#: Sends one radiograph's result objects (pydicom datasets) or raises :class:`DeliveryError`.
Sender = Callable[[list[Any]], None]


class Outbox:
    """The folder of results not yet delivered, and the rounds that deliver them.

    ``send`` delivers one entry's datasets; ``quarantine`` (a folder) receives entries given up on, each beside
    ``NAME.results.reason.txt``. Thread-safe: workers :meth:`put` while one thread calls :meth:`deliver`.
    """

    def __init__(self, folder: Path, send: Sender, *, quarantine: Path, retry_s: float = 10.0,
                 give_up_s: float = 24 * 3600.0) -> None:  # fmt: skip
        if not (retry_s > 0 and give_up_s > 0):  # `not >` so that NaN is refused too
            raise ValueError(f"the delivery retry and give-up times must be positive, not {retry_s}, {give_up_s}")
        self.folder, self.send, self.quarantine = Path(folder), send, Path(quarantine)
        self.retry_s, self.give_up_s = retry_s, give_up_s
        self.delivered = 0  # entries
        self.failed_rounds = 0
        self.given_up = 0
        self._failures = 0  # consecutive failed rounds: the backoff's exponent
        self._next_try = 0.0  # monotonic
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the folder and remove what a crash left half-written (its radiograph is still queued)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f"{_TEMPORARY}*"):
            shutil.rmtree(stale, ignore_errors=True)

    def put(self, name: str, datasets: Iterable[Any]) -> Path:
        """Write one radiograph's results as entry ``name``: whole (written in a temporary folder, then
        renamed) or, when a write fails (a full disk), not at all."""
        from pydicom import dcmwrite

        temporary = self.folder / f"{_TEMPORARY}{name}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        try:
            for k, ds in enumerate(datasets):
                with (temporary / f"{k}.dcm").open("wb") as fh:
                    dcmwrite(fh, ds, enforce_file_format=True)
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        target = self.folder / name
        temporary.replace(target)
        return target

    def __contains__(self, name: str) -> bool:
        return (self.folder / name).is_dir()

    def pending(self) -> list[Path]:
        """Entries waiting, oldest first (names begin with the time the radiograph was received)."""
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(_TEMPORARY))

    def due_in(self, now: float | None = None) -> float:
        """Seconds until the next round may try the destination (0: now)."""
        with self._lock:
            return max(0.0, self._next_try - (time.monotonic() if now is None else now))

    def deliver(self) -> float | None:
        """One round: deliver the waiting entries, oldest first, until the destination fails for a reason that
        may pass. Returns the seconds until the next round is due, or ``None`` when nothing waits."""
        if (wait := self.due_in()) > 0:
            return wait
        delivered = 0
        for entry in self.pending():
            if time.time() - entry.stat().st_mtime > self.give_up_s:
                self._give_up(entry, f"not delivered within {self.give_up_s / 3600:g} h")
                continue
            try:
                self.send([_read(path) for path in sorted(entry.glob("*.dcm"))])
            except DeliveryError as exc:
                if not exc.transient:
                    self._give_up(entry, f"the destination refused the results ({exc})")
                    continue
                return self._away(exc, len(self.pending()))
            except Exception as exc:  # an entry that cannot be read or sent: never retried for ever
                self._give_up(entry, f"the results could not be sent ({type(exc).__name__})")
                continue
            shutil.rmtree(entry)
            delivered += 1
        with self._lock:
            self.delivered += delivered
            back, self._failures = self._failures, 0
        if back and delivered:
            log.info("the destination is back: %d result set(s) delivered that waited", delivered)
        return None

    def _away(self, exc: DeliveryError, waiting: int) -> float:
        with self._lock:
            wait = self.retry_s * min(2**self._failures, _MAX_BACKOFF)
            self._failures += 1
            self.failed_rounds += 1
            self._next_try = time.monotonic() + wait
        log.warning("results not delivered (%s): %d result set(s) wait; next try in %.0f s", exc, waiting, wait)
        return wait

    def _give_up(self, entry: Path, reason: str) -> None:
        target = self.quarantine / f"{entry.name}.results"
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)
        entry.replace(target)
        atomic_write_text(target.parent / f"{target.name}.reason.txt", reason + "\n")
        with self._lock:
            self.given_up += 1
        log.warning("quarantined the results %s: %s", target.name, reason)


def _read(path: Path) -> Any:
    from pydicom import dcmread

    return dcmread(path)


def c_store(calling: str, called: str, host: str, port: int) -> Sender:
    """A sender that stores each dataset by C-STORE over one association with ``called@host:port``."""

    def send(datasets: list[Any]) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=calling)
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(host, port, ae_title=called)
        if not assoc.is_established:  # no one listening, or rejected: both pass once the PACS is back or fixed
            raise DeliveryError(f"no association with {called}", transient=True)
        try:
            for ds in datasets:
                try:
                    status = getattr(assoc.send_c_store(ds), "Status", None)
                except (RuntimeError, OSError):  # the association ended under it (aborted, connection lost)
                    status = None
                if status is None:  # no answer: a timeout or an abort
                    raise DeliveryError(f"{called} did not answer a C-STORE", transient=True)
                if not (status == SUCCESS or 0xB000 <= status <= 0xBFFF):  # a warning: stored, coerced
                    raise DeliveryError(f"{called} answered status 0x{status:04X} to a C-STORE",
                                        transient=0xA700 <= status <= 0xA7FF)  # fmt: skip
        finally:
            if assoc.is_established:
                assoc.release()

    return send


def stow_rs(url: str, *, answer_timeout_s: float = ANSWER_TIMEOUT_S) -> Sender:
    """A sender that stores the datasets by one STOW-RS request to ``url`` (dicomweb-client), whose answer
    is read within ``MAX_ANSWER_MB`` and ``answer_timeout_s``: a server that never ends it fails the round.

    Each round opens its own connections and tries once (``retries=0``): the outbox's rounds are the retries.

    Raises:
        ValueError: ``url`` is not an ``http://`` or ``https://`` URL with a host (here, not at the first round).
    """
    check_url(url, "a STOW-RS URL")

    def send(datasets: list[Any]) -> None:
        import requests

        with DicomWeb(url, answer_timeout_s=answer_timeout_s, retries=0) as web:
            try:
                answer = web.client.store_instances(datasets)
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else 500
                raise DeliveryError(f"STOW-RS answered HTTP {status}",
                                    transient=status >= 500 or status in (408, 429)) from None  # fmt: skip
            except (requests.RequestException, OSError) as exc:  # requests' message quotes the URL
                raise DeliveryError(f"STOW-RS failed ({failure(exc)})", transient=True) from None
        reasons = refused_by_stow(answer)
        if reasons:  # 0xA7xx: out of resources; 0x0110: a processing failure, the server's own
            codes = ", ".join(f"0x{reason:04X}" for reason in reasons)
            raise DeliveryError(f"STOW-RS did not store {len(reasons)} of {len(datasets)} objects ({codes})",
                                transient=all(0xA700 <= r <= 0xA7FF or r == 0x0110 for r in reasons))  # fmt: skip

    return send
