"""A DICOMweb server, within limits: each instance fetched as the bytes of its file, read no further than a
size and a time limit, so that fracdet's own reader is the first to parse it.

Searches (QIDO-RS) and stores (STOW-RS) go through dicomweb-client, on a session (:func:`bounded_session`)
that reads every answer no further than ``MAX_ANSWER_MB`` and ``ANSWER_TIMEOUT_S``: dicomweb-client reads an
answer whole and its 20 s timeout is between reads, so a search answered with 280 MB of JSON took a pull to
4.8 GB, and one that sent a byte every half second held it (or the node's delivery thread, for a store's
answer) for as long as it went on. Its ``retrieve_instance`` does not
suit an image of unknown origin: it reads the whole answer into memory and hands it to pydicom, which
inflates a deflated dataset whole, before fracdet's bounded reader (pixel limit, inflation limit, element
count) sees a byte. An image that any modality stored in the PACS, or a server answering without end, could
so make ``fracdet pacs pull`` or a manifest of DICOMweb URLs hold gigabytes: an answer of 1 GiB took a pull
to 4.9 GB, and so did 1 MB of deflated data inflating to 1 GiB (``benchmarks/dicomweb_answers.py``).
:meth:`DicomWeb.instance` streams the answer (``multipart/related`` parsed by python-multipart as it
arrives, or a bare ``application/dicom`` from servers that send one), stops at ``max_mb`` and at
``timeout_s`` (a watchdog shuts the socket for reading, so a server that sends a byte a minute cannot hold
it), and returns bytes.

Both time limits cover an answer's status line and headers too, not only its body: http.client reads up to
100 header lines of 64 kB each with requests' timeout between reads, so a server that sent them a byte at a
time held a pull for years. And one retry policy, the session's (urllib3's ``Retry``: a connection refused
or an HTTP 408, 429, 502, 503 or 504 gets three more tries, at once, then 1 s and 2 s later), replaces
dicomweb-client's, which tried every request five times whatever failed, waiting 30 s in all: an answer
over a limit was fetched five times, and a server that was down took half a minute to say so.
"""

from __future__ import annotations

import contextlib
import contextvars
import email.message
import functools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fracdet.data.dicom import DICOM_HINT

__all__ = [
    "ANSWER_TIMEOUT_S",
    "MAX_ANSWER_MB",
    "MAX_INSTANCE_MB",
    "RETRIES",
    "RETRIEVE_TIMEOUT_S",
    "DicomWeb",
    "RetrievalError",
    "bounded_session",
    "check_url",
    "failure",
    "refused_by_stow",
]

#: The largest instance fetched, as the PACS node's ``max_store_mb``: a radiograph is tens of megabytes.
MAX_INSTANCE_MB = 256
#: The largest answer to a search or a store: a study search lists about 1 kB a study, and the answer is
#: parsed whole, at about 14 times its size (280 MB took a pull from 0.9 to 4.8 GB, dicomweb_answers.py), so
#: 32 MB is some 30,000 studies and under 0.5 GB more.
MAX_ANSWER_MB = 32
#: How long such an answer may take, headers and body, once the request was sent: 32 MB at 20 Mbit/s takes
#: 13 s. A server that never ends its answers holds a search this long: an answer is not asked for again.
ANSWER_TIMEOUT_S = 30.0
#: How long one instance may take to arrive, whole, from its request: 256 MB at 20 Mbit/s takes about 100 s.
RETRIEVE_TIMEOUT_S = 120.0
#: How often a request is tried again when the server is not there or says it is busy (the HTTP statuses
#: below): at once, then after 1 s and 2 s (urllib3's backoff, factor 0.5). ``Retry-After`` is not obeyed:
#: urllib3 would wait up to 6 hours for it.
RETRIES = 3
_BUSY = (408, 429, 502, 503, 504)
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 20


class RetrievalError(OSError):
    """An instance could not be fetched within the limits; the message names neither URL nor identifier.

    An ``OSError``, as the archive reader expects of a file it cannot read: the row's error, not the job's end.
    """


def check_url(url: str, what: str = "a DICOMweb root URL") -> str:
    """``url`` when it is an ``http://`` or ``https://`` URL with a host; a ``ValueError`` naming ``what``
    otherwise (requests would fail on it only at the first request: a node at its first result)."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{url!r} is not {what} (http://HOST[:PORT]/PATH)")
    return url


def failure(exc: Exception) -> str:
    """What went wrong talking to the server, in words without the URL (requests' messages quote it, and a
    study's URL holds its UID): the HTTP status, a limit the answer passed, or the kind of error (no
    connection, not JSON, ...)."""
    if isinstance(exc, RetrievalError):  # fracdet's own words, which name no URL
        return str(exc)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def bounded_session(*, max_mb: float = MAX_ANSWER_MB, timeout_s: float = ANSWER_TIMEOUT_S,
                    retries: int = RETRIES) -> Any:  # fmt: skip
    """A ``requests.Session`` that reads no answer beyond ``max_mb``, nor for longer than ``timeout_s`` from
    when its request was sent, and tries a request again only when the server is not there or busy.

    For the answers others read whole (dicomweb-client's searches and stores): a response hook reads the body
    before requests would, within the limits, and a watchdog shuts the socket at the time limit, while the
    headers arrive and while the body does, so that a server sending a byte now and then cannot hold the
    caller. An answer over a limit raises :class:`RetrievalError` from the request, and is not asked for
    again. Streamed requests (``stream=True``) read their body as their caller does, who bounds it
    (:meth:`DicomWeb.instance`); their headers are bounded here, by the caller's deadline if it set one
    (:func:`_answer_clock`). ``retries`` is how many more tries a refused connection or a busy answer
    (HTTP 408, 429, 502, 503, 504) gets; 0 where the caller has its own policy (the node's outbox).

    Raises:
        ValueError: a limit is not positive, or ``retries`` is negative.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    if not (max_mb > 0 and timeout_s > 0):  # `not >` so that NaN is refused too
        raise ValueError(f"the answer limits must be positive: max_mb {max_mb}, timeout_s {timeout_s}")
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, not {retries}")
    max_bytes = int(max_mb * (1 << 20))

    def read_within_limits(answer: Any, *args: Any, stream: bool = False, **kwargs: Any) -> Any:
        if stream:
            return answer
        deadline = _CLOCK.get().start()  # the clock of `Session.send`, which dispatches this hook
        try:
            _check_declared(answer, max_bytes)
            with _watchdog(answer.raw.shutdown, deadline):
                body = _read(answer, max_bytes, deadline, timeout_s)
        except BaseException:
            answer.close()  # the connection is dropped, not returned to the pool half read
            raise
        answer._content, answer._content_consumed = body, True  # as requests' own `content` leaves them
        return answer

    class Session(requests.Session):
        def send(self, request: Any, **kwargs: Any) -> Any:
            with _answer_clock(timeout_s) as clock:
                try:
                    return super().send(request, **kwargs)
                except requests.RequestException:  # the watchdog shut the socket as the headers came
                    if clock.passed():
                        raise RetrievalError(f"the answer did not arrive within {clock.timeout_s:g} s") from None
                    raise

    # a refused connection is a connect error to urllib3 (NewConnectionError is a ConnectTimeoutError); a read
    # cut off is not tried again (the server may have acted on the request), nor is a certificate refused
    # ("other") or a status not listed
    retry = Retry(total=retries, read=0, other=0, status=retries, status_forcelist=_BUSY, backoff_factor=0.5,
                  allowed_methods=None, raise_on_status=False, respect_retry_after_header=False)  # fmt: skip

    class Adapter(HTTPAdapter):  # every pool it makes holds watched connections, a proxy's too (not SOCKS)
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = _watched_pools()

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS has pools of its own
                manager.pool_classes_by_scheme = _watched_pools()
            return manager

    adapter = Adapter(max_retries=retry)
    session = Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, adapter)
    session.hooks["response"].append(read_within_limits)
    return session


def refused_by_stow(answer: Any) -> list[int]:
    """The failure reason of each instance a STOW-RS answer (the dataset dicomweb-client's ``store_instances``
    returns) lists as not stored; empty when all were stored.

    A STOW-RS server that stores some instances and not others answers 202 with a *Failed SOP Sequence*
    (PS3.18 10.5.3): a success to requests and to dicomweb-client, which only logs it. Read here, so that
    results a PACS did not keep are not counted as delivered.
    """
    return [int(getattr(item, "FailureReason", 0x0110)) for item in getattr(answer, "FailedSOPSequence", None) or []]


class DicomWeb:
    """One DICOMweb server (``url``: its root, e.g. ``http://pacs:8042/dicom-web``).

    ``client`` is dicomweb-client's, for searches and stores, sharing this object's HTTP session (and so its
    connections), which reads their answers within ``answer_mb`` and ``answer_timeout_s``; :meth:`instance`
    fetches files within ``max_mb`` and ``timeout_s``. Every request is tried ``retries`` more times when the
    server is not there or busy, and no other time (:func:`bounded_session`). Close it (or use it in a
    ``with`` block) to release the connections.

    Raises:
        ValueError: ``url`` is not an ``http://`` or ``https://`` URL with a host, a limit is not positive, or
            ``retries`` is negative.
    """

    def __init__(self, url: str, *, max_mb: float = MAX_INSTANCE_MB, timeout_s: float = RETRIEVE_TIMEOUT_S,
                 answer_mb: float = MAX_ANSWER_MB, answer_timeout_s: float = ANSWER_TIMEOUT_S,
                 retries: int = RETRIES):  # fmt: skip
        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError as exc:
            raise ImportError(DICOM_HINT) from exc
        check_url(url)
        if not (max_mb > 0 and timeout_s > 0):  # `not >` so that NaN is refused too
            raise ValueError(f"the retrieval limits must be positive: max_mb {max_mb}, timeout_s {timeout_s}")
        self.url = url.rstrip("/")
        self.max_bytes = int(max_mb * (1 << 20))
        self.timeout_s = timeout_s
        self.session = bounded_session(max_mb=answer_mb, timeout_s=answer_timeout_s, retries=retries)
        self.client = DICOMwebClient(url=self.url, session=self.session)
        self.client.set_http_retry_params(retry=False)  # the session's policy is the one (module docstring)

    def instance(self, study: str, series: str, instance: str) -> bytes:
        """The DICOM file of one instance (WADO-RS), as bytes, never parsed here.

        Raises:
            RetrievalError: the server refused or failed, answered something that is not DICOM, or sent more
                than ``max_mb`` or for longer than ``timeout_s``.
        """
        import requests

        url = f"{self.url}/studies/{study}/series/{series}/instances/{instance}"
        # the deadline counts from the request: headers that came slowly leave the body less time
        with _answer_clock(self.timeout_s, now=True) as clock:
            try:
                with self.session.get(url, headers={"Accept": _ACCEPT}, stream=True, timeout=self.timeout_s) as answer:
                    answer.raise_for_status()
                    with _watchdog(answer.raw.shutdown, clock.start()):
                        return self._body(answer, clock.start())
            except RetrievalError:
                raise
            except (requests.RequestException, OSError, ValueError) as exc:
                if clock.passed():
                    raise RetrievalError(f"the answer did not arrive within {self.timeout_s:g} s") from None
                raise RetrievalError(f"DICOMweb retrieval failed ({failure(exc)})") from None

    def _body(self, answer: Any, deadline: float) -> bytes:
        header = email.message.Message()
        header["content-type"] = answer.headers.get("Content-Type", "")
        kind, boundary = header.get_content_type(), header.get_param("boundary")
        _check_declared(answer, self.max_bytes)
        if kind == "application/dicom":  # not the standard's multipart, but some servers answer so
            return _read(answer, self.max_bytes, deadline, self.timeout_s)
        if kind != "multipart/related" or not isinstance(boundary, str):
            raise RetrievalError(f"the server answered {kind}, not DICOM")
        from python_multipart.multipart import MultipartParser

        parts: list[bytearray] = []
        ended, received = [], 0
        parser = MultipartParser(boundary, callbacks={
            "on_part_begin": lambda: parts.append(bytearray()),
            "on_part_data": lambda data, start, end: parts[-1].extend(data[start:end]),
            "on_part_end": lambda: ended.append(True),
        })  # fmt: skip
        for chunk in answer.iter_content(_CHUNK):
            received += len(chunk)
            _check(received, self.max_bytes, deadline, self.timeout_s)  # a preamble or part headers count too
            parser.write(chunk)
            if ended:  # one instance is one part: the rest is not read
                return bytes(parts[0])
        raise RetrievalError("the answer ended before its first part did")

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> DicomWeb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(answer: Any, max_bytes: int, deadline: float, timeout_s: float) -> bytes:
    """The body of ``answer`` (a streamed response), read no further than ``max_bytes`` and ``deadline``.

    A chunk that never comes is the caller's to end, by :func:`_watchdog`: a read blocked on the socket
    checks nothing.
    """
    body = bytearray()
    try:
        for chunk in answer.iter_content(_CHUNK):
            body += chunk
            _check(len(body), max_bytes, deadline, timeout_s)
    except RetrievalError:
        raise
    except Exception as exc:  # the socket shut by the watchdog, or the connection lost
        if time.monotonic() >= deadline:
            raise RetrievalError(f"the answer did not arrive within {timeout_s:g} s") from None
        raise RetrievalError(f"the answer was cut off ({type(exc).__name__})") from None
    return bytes(body)


class _Clock:
    """When the answer to the request in progress must have come: ``timeout_s`` after it was sent (the first
    time its connection waits for an answer), or after the caller began, with ``now``."""

    def __init__(self, timeout_s: float, *, now: bool = False):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s if now else None

    def start(self) -> float:
        """The deadline, which begins now unless it has begun."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        return self.deadline

    def passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


_CLOCK: contextvars.ContextVar[_Clock | None] = contextvars.ContextVar("fracdet_dicomweb_clock", default=None)


@contextlib.contextmanager
def _answer_clock(timeout_s: float, *, now: bool = False) -> Iterator[_Clock]:
    """The clock of the requests made in the block (each thread its own): a new one, or the enclosing
    block's, so that a caller's deadline (:meth:`DicomWeb.instance`) holds for the session's retries too."""
    if (clock := _CLOCK.get()) is not None:
        yield clock
        return
    token = _CLOCK.set(clock := _Clock(timeout_s, now=now))
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


class _HeadersOnTime:
    """Mixed into urllib3's connections: the status line and headers of an answer are read by the deadline
    of the request's clock, so the watchdog covers them as it covers the body."""

    sock: Any

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        clock = _CLOCK.get()
        if clock is None or self.sock is None:
            return super().getresponse(*args, **kwargs)  # type: ignore[misc]
        with _watchdog(functools.partial(self.sock.shutdown, socket.SHUT_RDWR), clock.start()):
            answer = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        if clock.passed():  # http.client ends the headers where the shut socket ended them: cut off, not whole
            answer.close()
            raise TimeoutError("the answer's headers did not arrive in time")
        return answer


@functools.cache
def _watched_pools() -> dict[str, type]:
    """urllib3's connection pools, for ``PoolManager.pool_classes_by_scheme``, whose connections are
    :class:`_HeadersOnTime` (defined on first use: urllib3 comes with the ``dicom`` extra)."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Plain(_HeadersOnTime, HTTPConnection):
        pass

    class Secure(_HeadersOnTime, HTTPSConnection):
        pass

    return {
        "http": type("WatchedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": Plain}),
        "https": type("WatchedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": Secure}),
    }


@contextlib.contextmanager
def _watchdog(shut: Callable[[], object], deadline: float) -> Iterator[None]:
    """Call ``shut`` (a socket's or a response's ``shutdown``) at ``deadline`` unless the block has ended: a
    server that sends a byte now and then keeps each read within requests' timeout between reads, so only a
    clock outside the read ends it (the blocked read returns or raises)."""
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _quietly, args=(shut,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _check_declared(answer: Any, max_bytes: int) -> None:
    """Refuse an answer whose declared ``Content-Length`` is over the limit before a byte of it is read."""
    declared = answer.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RetrievalError(_too_large(max_bytes))


def _check(size: int, max_bytes: int, deadline: float, timeout_s: float) -> None:
    if size > max_bytes:
        raise RetrievalError(_too_large(max_bytes))
    if time.monotonic() >= deadline:
        raise RetrievalError(f"the answer did not arrive within {timeout_s:g} s")


def _too_large(max_bytes: int) -> str:
    return f"the answer is larger than {max_bytes / (1 << 20):g} MB (the retrieval limit)"


def _quietly(shut: Callable[[], object]) -> None:
    with contextlib.suppress(ValueError, RuntimeError, OSError):  # released or closed: nothing reads it
        shut()
