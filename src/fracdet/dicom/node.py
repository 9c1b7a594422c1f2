"""A DICOM node for a radiology department: radiographs in by C-STORE, results out to the PACS.

``fracdet pacs listen`` runs a :class:`PacsNode`. The PACS routes radiographs to it (C-STORE: CR, DX for
presentation and for processing, any transfer syntax; C-ECHO answers); for each one it sends back the
structured report, presentation state and secondary capture of :mod:`fracdet.dicom.results`, by C-STORE to
the configured destination (or STOW-RS).

Design, so that a hospital can leave it running:

* **The store handler only spools.** A received dataset is written atomically (temporary file, fsync,
  rename) into ``SPOOL/queue`` and queued; analysis happens in worker threads, so a slow model never stalls
  an association. It reads the header alone, as sent (a deflated dataset is inflated no further than a
  header reaches: a few kilobytes cannot claim gigabytes of the node). The queue is bounded: beyond
  ``queue_size`` waiting images the handler answers *Out of Resources* (0xA700) and the PACS retries later.
* **Nothing is lost.** A spooled file leaves ``queue/`` only when its results were written to ``outbox/``
  (to ``done/``) or it failed (to ``quarantine/``, with ``NAME.reason.txt`` saying why without identifiers).
  Files still in ``queue/`` at start-up, left by a crash or a stop, are analysed first.
* **Results wait for a destination that is away** (:mod:`fracdet.dicom.outbox`): they stay in ``outbox/``,
  across restarts, and are delivered when it is back, oldest first; after ``delivery_give_up_h`` they are
  quarantined. Analysis goes on meanwhile.
* **One node per spool**: a second node started on a spool in use is refused before it touches anything
  (it would analyse the same queued files, and delete the first's half-received images as stale).
* **Only known callers**: associations from calling AE titles outside ``allowed_callers`` are rejected.
* **Bounded on the wire** (:class:`fracdet.dicom.guard.PeerGuard`): any peer, before its AE title is known,
  can make the node hold at most one PDU of 1 MiB per connection, and only for ``network_timeout_s``; an
  allowed caller at most ``max_store_mb`` per image (about twice that while it is spooled) on each of at
  most ``max_associations`` associations. Beyond them the connection is closed and the refusal logged.
  A connection that has not sent its association request takes none of those associations, and at most
  four such wait from one address (sixty-four in all), so sockets that send nothing cannot keep the
  modalities out.
* **Its own objects are ignored**: results routed back to it (by a rule that sends everything) are
  accepted and dropped, never analysed again.
* **Each image once**: a radiograph whose SOP Instance UID is already queued or done (a PACS that retries a
  store it thinks failed, a routing rule that fires twice) is accepted and not analysed again, so a study
  never gets two result series for one image. Spooled files are named by the keyed hash of that UID.
* **Retention**: files in ``done/`` and ``quarantine/`` older than ``retention_days`` are deleted.
* **No identifiers in logs**: a study is logged as its keyed hash (:func:`fracdet.data.dicom.keyed_hash`),
  with the highest level over its images so far.

Needs the ``dicom`` extra (pynetdicom, pydicom, highdicom).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracdet.data.decode import ImageReadError
from fracdet.data.dicom import DICOM_HINT, keyed_hash, read_dicom_header
from fracdet.dicom.dicomweb import check_url
from fracdet.dicom.guard import MAX_WAITING, MAX_WAITING_PER_ADDRESS, PeerGuard, awaiting_request, node_ae
from fracdet.dicom.outbox import SUCCESS, Outbox, c_store, stow_rs
from fracdet.dicom.results import is_fracdet_result, results_for
from fracdet.inference.gate import NotARadiographError
from fracdet.inference.predictor import Predictor
from fracdet.models.release import TrainedModel
from fracdet.utils.atomic import atomic_write_text
from fracdet.utils.lock import exclusive

__all__ = ["Destination", "NodeConfig", "PacsNode"]

log = logging.getLogger(__name__)

#: C-STORE status: refused for lack of resources (the queue is full), which a PACS retries; not understood.
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000
#: How many studies' running summaries (images, highest level; for the log) the node keeps. Kept for every
#: study, they grew without end in a node that runs for months (about 0.3 kB a study), where the keys of the
#: images received are let go with their files at retention.
RECENT_STUDIES = 1024
_LEVELS = ("definite", "suspicious")
#: The longest PDU read from any peer: the node advertises pynetdicom's 16 KiB, this leaves room for peers
#: that ignore it, and an association request of many presentation contexts is a few kilobytes.
MAX_PDU_BYTES = 1 << 20


@dataclass(frozen=True)
class Destination:
    """Where results go: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        try:
            ae_title, address = text.split("@", 1)
            host, port = address.rsplit(":", 1)
            return cls(ae_title, host, int(port))
        except ValueError:
            raise ValueError(f"destination {text!r} is not AE@HOST:PORT") from None


@dataclass(frozen=True)
class NodeConfig:
    """How the node listens, whom it accepts, where it sends, and what it keeps.

    Attributes:
        spool: working folder (``queue/``, ``done/``, ``quarantine/`` below it).
        allowed_callers: calling AE titles accepted (the PACS and its routers); others are rejected.
        send_to: the C-STORE destination of results (usually the PACS itself).
        stow_url: a DICOMweb STOW-RS endpoint instead of (or beside) C-STORE.
        queue_size: images waiting for analysis beyond which stores are refused (Out of Resources).
        workers: analysis threads (one keeps a 2-core server responsive).
        retention_days: how long ``done/`` and ``quarantine/`` keep their files.
        max_store_mb: the largest image (its encoded dataset) a caller may send; a larger one ends the
            association as soon as it passes the limit (a DX of 43 x 43 cm at 0.1 mm is about 37 MB).
        max_associations: associations at once; more are rejected (transiently: the PACS retries).
        network_timeout_s: the longest a peer may take over one PDU, or stay silent in an association.
        delivery_retry_s: the wait after a delivery the destination did not take, doubled after each failed
            round up to thirty times this.
        delivery_give_up_h: how long results wait for the destination before they are quarantined.
    """

    spool: Path
    allowed_callers: tuple[str, ...]
    ae_title: str = "FRACDET"
    host: str = "127.0.0.1"
    port: int = 11112
    send_to: Destination | None = None
    stow_url: str | None = None
    queue_size: int = 32
    workers: int = 1
    retention_days: float = 7.0
    max_store_mb: float = 256.0
    max_associations: int = 4
    network_timeout_s: float = 60.0
    delivery_retry_s: float = 10.0
    delivery_give_up_h: float = 24.0

    def __post_init__(self) -> None:
        """Refuse at start what pynetdicom would refuse with a traceback (an AE title of 17 characters, port
        99999) or what would run without working: no worker, a queue that refuses every store, a negative
        retention that deletes every result and quarantined file as it lands, a STOW-RS URL that is none."""
        if not self.allowed_callers:
            raise ValueError("name the calling AE titles to accept (the PACS and its routers): none given")
        if self.send_to is None and self.stow_url is None:
            raise ValueError("give a destination for the results: send_to (C-STORE) or stow_url (STOW-RS)")
        if self.stow_url is not None:  # without a scheme, every image was analysed, then quarantined
            check_url(self.stow_url, "a STOW-RS URL")
        titles = [("the node's AE title", self.ae_title), *(("an allowed caller", t) for t in self.allowed_callers)]
        if self.send_to is not None:
            titles.append(("the destination's AE title", self.send_to.ae_title))
        for what, title in titles:
            if not (0 < len(title.strip()) <= 16 and title.isascii() and title.isprintable() and "\\" not in title):
                raise ValueError(f"{what} {title!r} is not a DICOM AE title (1 to 16 characters, no backslash)")
        for what, port in (("port", self.port), ("the destination's port", self.send_to and self.send_to.port)):
            if port is not None and not 0 < port < 65536:
                raise ValueError(f"{what} must be 1 to 65535, not {port}")
        if not (self.queue_size >= 1 and self.workers >= 1):
            raise ValueError(f"need at least one worker and one queue slot, not {self.workers} and {self.queue_size}")
        if not self.retention_days >= 0:  # NaN fails too
            raise ValueError(f"retention_days must be 0 (keep nothing) or more, not {self.retention_days}")
        for what, value in (("max_store_mb", self.max_store_mb), ("max_associations", self.max_associations),
                            ("network_timeout_s", self.network_timeout_s),
                            ("delivery_retry_s", self.delivery_retry_s),
                            ("delivery_give_up_h", self.delivery_give_up_h)):  # fmt: skip
            if not value > 0:
                raise ValueError(f"{what} must be more than 0, not {value}")


@dataclass
class _Study:
    images: int = 0
    probability: float = 0.0
    level: str | None = None


@dataclass
class NodeStats:
    """What the node has done since it started (for logs and tests)."""

    received: int = 0
    refused_full: int = 0
    refused_peers: int = 0  # connections closed by the guard: a PDU or image too large, a peer too slow
    ignored_own: int = 0
    duplicates: int = 0
    analysed: int = 0
    quarantined: int = 0
    failed: int = 0  # images not handled (a full disk): left where the failure found them
    sent: int = 0  # result objects delivered
    #: the running summary of the last ``RECENT_STUDIES`` studies to send an image, oldest first
    studies: OrderedDict[str, _Study] = field(default_factory=OrderedDict)


def _pynetdicom() -> Any:
    try:
        import pynetdicom
    except ImportError as exc:
        raise ImportError(DICOM_HINT) from exc
    return pynetdicom


class PacsNode:
    """A C-STORE SCP that analyses radiographs and sends DICOM results; use it as a context manager.

    ``hold`` (a :class:`threading.Event`, set by default) pauses the workers while cleared: maintenance, and
    the tests that need images to wait in the queue.
    """

    def __init__(self, model: TrainedModel, config: NodeConfig, *, hold: threading.Event | None = None) -> None:
        self.model, self.config = model, config
        self.predictor = Predictor(model, heatmaps=True)
        self.stats = NodeStats()
        self.go = hold if hold is not None else threading.Event()
        if hold is None:
            self.go.set()
        self._queue: queue.Queue[tuple[Path, bool] | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(config.queue_size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self.dirs = {name: Path(config.spool) / name
                     for name in ("incoming", "queue", "done", "quarantine", "outbox")}  # fmt: skip
        senders = [c_store(config.ae_title, d.ae_title, d.host, d.port) for d in [config.send_to] if d is not None]
        senders += [stow_rs(url) for url in [config.stow_url] if url is not None]
        self.outbox = Outbox(self.dirs["outbox"], lambda datasets: self._send(senders, datasets),
                             quarantine=self.dirs["quarantine"], retry_s=config.delivery_retry_s,
                             give_up_s=config.delivery_give_up_h * 3600)  # fmt: skip
        self._held = contextlib.ExitStack()  # the spool's lock, from start to stop
        self._wake = threading.Event()  # results written, or the node stopping: the delivery thread looks
        self._seen: set[str] = set()  # keyed hashes of the SOP Instance UIDs queued or done
        self._waiting: dict[Any, str] = {}  # connections yet to send their association request: their address

    # --- lifecycle ----------------------------------------------------------------------------------------

    def __enter__(self) -> PacsNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create the spool, queue what a previous run left, start the workers and the listener.

        Raises:
            OSError: the node cannot listen on its address (the port is taken); nothing is left running.
            FolderInUseError: another node works in the spool (it would analyse the same files, and delete
                the other's half-received images as left by a crash).
        """
        pynetdicom = _pynetdicom()
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import (
            ComprehensiveSRStorage,
            ComputedRadiographyImageStorage,
            DigitalXRayImageStorageForPresentation,
            DigitalXRayImageStorageForProcessing,
            GrayscaleSoftcopyPresentationStateStorage,
            SecondaryCaptureImageStorage,
            Verification,
        )

        Path(self.config.spool).mkdir(parents=True, exist_ok=True)
        self._held.enter_context(exclusive(self.config.spool, "a PACS node"))  # before anything in it is touched
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.dirs["incoming"].iterdir():  # half-written when a previous run died: never queued
            stale.unlink(missing_ok=True)
        self.outbox.open()
        for analysed in [p for p in self.dirs["queue"].glob("*.dcm") if p.stem in self.outbox]:
            analysed.replace(self.dirs["done"] / analysed.name)  # stopped between its results and its move
        self._seen = {_key_of(p) for folder in ("queue", "done") for p in self.dirs[folder].glob("*.dcm")}
        left = sorted(self.dirs["queue"].glob("*.dcm"), key=lambda p: p.stat().st_mtime)
        for path in left:
            self._queue.put((path, False))
        if left:
            log.info("picked up %d spooled images left by a previous run", len(left))
        ae = node_ae(self.config.ae_title)
        ae.require_calling_aet = list(self.config.allowed_callers)
        radiographs = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                       DigitalXRayImageStorageForProcessing)  # fmt: skip
        routed_back = (ComprehensiveSRStorage, GrayscaleSoftcopyPresentationStateStorage, SecondaryCaptureImageStorage)
        for sop_class in (*radiographs, *routed_back):
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.network_timeout_s
        self._ae = ae
        for k in range(self.config.workers):
            thread = threading.Thread(target=self._work, name=f"fracdet-worker-{k}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for target, name in ((self._sweep, "fracdet-retention"), (self._deliver, "fracdet-delivery")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        handlers = [(evt.EVT_CONN_OPEN, self._on_connect), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS)]  # fmt: skip
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers)
        except OSError as exc:  # the port is taken, or the address is not this machine's: end the workers too
            self.stop()
            raise OSError(
                exc.errno, f"cannot listen on {self.config.host}:{self.config.port} ({exc.strerror})"
            ) from None
        log.info("%s listening on %s:%d (pynetdicom %s), results to %s", self.config.ae_title, self.config.host,
                 self.config.port, pynetdicom.__version__, self.config.send_to or self.config.stow_url)  # fmt: skip

    def stop(self) -> None:
        """Stop listening, let the workers finish the image in hand, and return; the queue stays on disk."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self.go.set()
        self._wake.set()
        for _ in range(self.config.workers):
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        self._held.close()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every queued image was analysed and its results delivered, or wait in ``outbox/`` for a
        destination that is away (for tests and graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and (not self.outbox.pending() or self.outbox.due_in() > 0):
                return True
            time.sleep(0.05)
        return False

    # --- receiving ----------------------------------------------------------------------------------------

    def _on_connect(self, event: Any) -> None:
        """Bound the new connection's reads before its first byte is read (its AE title is not known yet), and
        close it at once if its address, or every address, already has as many connections waiting to send
        their association request as may wait."""
        guard = PeerGuard.install(event.assoc, max_pdu=MAX_PDU_BYTES, max_message=int(self.config.max_store_mb * 2**20),
                                  timeout_s=self.config.network_timeout_s, on_refusal=self._on_refusal)  # fmt: skip
        host = event.address[0]
        with self._lock:
            self._waiting = {assoc: peer for assoc, peer in self._waiting.items() if awaiting_request(assoc)}
            from_here, in_all = sum(peer == host for peer in self._waiting.values()), len(self._waiting)
            admitted = from_here < MAX_WAITING_PER_ADDRESS and in_all < MAX_WAITING
            if admitted:
                self._waiting[event.assoc] = host
        if not admitted:  # outside the lock: the refusal is counted under it
            guard.refuse(f"{from_here} connections from one address, {in_all} in all, already wait to send their "
                         "association request")  # fmt: skip

    def _on_refusal(self, reason: str) -> None:
        self._count("refused_peers")
        log.warning("%s", reason)

    def _on_store(self, event: Any) -> int:
        """Spool and queue; never analyse here (an association must not wait for the model)."""
        try:  # the header only, read within bounds (pynetdicom's own decoding inflates a deflated one whole)
            encoded = event.encoded_dataset()
            ds = read_dicom_header(encoded)
        except Exception:  # a dataset that does not decode: the peer sent something malformed
            log.warning("a received dataset could not be decoded: refused")
            return CANNOT_UNDERSTAND
        self._count("received")
        if is_fracdet_result(ds):
            self._count("ignored_own")
            return SUCCESS  # our own result routed back: accepted, never analysed again
        key = keyed_hash(str(ds.get("SOPInstanceUID", ""))) or uuid.uuid4().hex[:16]
        with self._lock:
            if key in self._seen:
                self.stats.duplicates += 1
                log.info("image %s was received before: not analysed again", key)
                return SUCCESS
        if not self._slots.acquire(blocking=False):
            self._count("refused_full")
            log.warning("queue full (%d waiting): store refused with Out of Resources", self.config.queue_size)
            return OUT_OF_RESOURCES
        try:
            path = self._spool(encoded, key)
        except OSError:
            self._slots.release()
            log.exception("could not spool a received image")
            return OUT_OF_RESOURCES
        with self._lock:
            self._seen.add(key)
        self._queue.put((path, True))
        return SUCCESS

    def _spool(self, data: bytes, key: str) -> Path:
        name = f"{time.time_ns():020d}-{key}.dcm"
        temporary = self.dirs["incoming"] / name
        with temporary.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        target = self.dirs["queue"] / name
        temporary.replace(target)
        return target

    # --- analysing ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.go.wait()
                if self._stop.is_set():
                    return  # the file stays in queue/: the next run takes it
                path, admitted = item
                try:
                    self._process(path)
                except Exception as exc:  # a full disk, a folder removed under it: this image, not the worker
                    self._count("failed")
                    log.error("image %s was not handled (%s); the worker goes on", path.name, _kind(exc))
                finally:
                    if admitted:
                        self._slots.release()
            finally:
                self._queue.task_done()

    def _process(self, path: Path) -> None:
        data = path.read_bytes()
        try:
            prediction = self.predictor.predict_bytes(data, path.name)
            results = results_for(data, prediction, self.model)
        except (ImageReadError, NotARadiographError) as exc:  # the reason file is named after it already
            self._quarantine(path, str(exc).removeprefix(f"{path.name}: "))
            return
        except Exception as exc:  # logged without its message or traceback: a library's may quote a value
            self._quarantine(path, f"analysis failed ({type(exc).__name__})")
            return
        self._count("analysed")
        try:
            self.outbox.put(path.stem, results.all())
        except Exception as exc:  # a full disk: the radiograph is quarantined, to be sent again
            self._quarantine(path, f"results not written ({_kind(exc)})")
            return
        path.replace(self.dirs["done"] / path.name)
        self._wake.set()
        self._summarise(keyed_hash(str(results.sr.StudyInstanceUID)), prediction)

    # --- delivering ---------------------------------------------------------------------------------------

    def _deliver(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the round: results written during it wake the next one
            try:
                wait = self.outbox.deliver()
            except Exception as exc:  # the outbox unreadable, a quarantine not writable: the next round, later
                log.error("a delivery round failed (%s); the next in %g s", _kind(exc), self.config.delivery_retry_s)
                wait = self.config.delivery_retry_s
            self._wake.wait(3600 if wait is None else wait)

    def _send(self, senders: list[Any], datasets: list[Any]) -> None:
        for send in senders:
            send(datasets)
        self._count("sent", len(datasets))

    def _quarantine(self, path: Path, reason: str) -> None:
        with self._lock:  # sent again (fixed, or once the destination is back), it is analysed again
            self._seen.discard(_key_of(path))
        target = self.dirs["quarantine"] / path.name
        path.replace(target)
        self._count("quarantined")
        log.warning("quarantined %s: %s", path.name, reason)
        try:
            atomic_write_text(target.parent / f"{target.name}.reason.txt", reason + "\n")
        except OSError as exc:  # a full disk: the image is kept; the log holds its reason
            log.error("the reason for %s was not written (%s)", path.name, _kind(exc))

    def _count(self, counter: str, n: int = 1) -> None:
        """Add to a counter of :attr:`stats`; stores and workers run on several threads at once."""
        with self._lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + n)

    def _summarise(self, study: str, prediction: Any) -> None:
        with self._lock:
            entry = self.stats.studies.setdefault(study, _Study())
            self.stats.studies.move_to_end(study)
            if len(self.stats.studies) > RECENT_STUDIES:  # a study's images come within minutes of each other
                self.stats.studies.popitem(last=False)
            entry.images += 1
            entry.probability = max(entry.probability, prediction.probability)
            levels = [lvl for lvl in _LEVELS if lvl in (entry.level, prediction.level)]
            entry.level = levels[0] if levels else None
        log.info("study %s: %d image(s), highest level %s (p=%.2f)", study, entry.images, entry.level or "none",
                 entry.probability)  # fmt: skip

    # --- retention ----------------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Delete files of ``done/`` and ``quarantine/`` older than the retention period; returns how many."""
        limit = (now if now is not None else time.time()) - self.config.retention_days * 86400
        removed = 0
        for folder in (self.dirs["done"], self.dirs["quarantine"]):
            for path in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < limit:
                        if path.is_dir():  # results given up on (NAME.results/)
                            shutil.rmtree(path)
                        else:
                            path.unlink()
                        removed += 1
                        if folder == self.dirs["done"]:
                            with self._lock:
                                self._seen.discard(_key_of(path))
        return removed

    def _sweep(self) -> None:
        while not self._stop.wait(3600):
            try:
                self.sweep()
            except Exception as exc:  # a file it may not delete: the next sweep tries again
                log.error("the retention sweep failed (%s)", _kind(exc))


def _kind(exc: Exception) -> str:
    """An error in words without its message (a library's may quote a path or a value): ENOSPC, not the file."""
    code = getattr(exc, "errno", None)
    return f"{type(exc).__name__}, {errno.errorcode.get(code, code)}" if code else type(exc).__name__


def _key_of(path: Path) -> str:
    """The keyed SOP Instance UID hash a spooled file is named by (``TIME-KEY.dcm``)."""
    return path.stem.split("-", 1)[-1]
