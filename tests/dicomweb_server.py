"""A DICOMweb server small enough to read, for the pull's tests and ``benchmarks/dicomweb_answers.py``: one
study of one DX series holding the instances it is given. QIDO-RS lists them, WADO-RS answers each as
``answer(instance)`` says (a content type, the pieces of the body, a pause between pieces), or each search
as ``search(level)`` says where it says anything; STOW-RS takes whatever it is sent and answers as
``stow()`` says (an HTTP status and a JSON body, or an :data:`Answer`). HTTP/1.0, so that a
body without a length ends when the connection closes. An answer whose content type is ``None`` is sent as
it is, status line and headers included (:func:`raw`, :func:`dripped_headers`)."""

from __future__ import annotations

import http.server
import itertools
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

SERIES = "1.2.826.0.1.3680043.8.498.75.1"
BOUNDARY = "fracdet-test"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'

#: What the server sends for an instance: its content type (None: the pieces hold the status line and headers
#: too), the pieces of its body, and a pause after each.
Answer = tuple[str | None, Iterable[bytes], float]


def multipart(*pieces: bytes) -> list[bytes]:
    """The pieces of a one-part ``multipart/related`` body around ``pieces`` (a DICOM file, or parts of one)."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return [head, *pieces, f"\r\n--{BOUNDARY}--\r\n".encode()]


def file(data: bytes) -> Answer:
    """The standard answer: ``data`` as the one part of a ``multipart/related`` body."""
    return MULTIPART, multipart(data), 0.0


def endless(pause: float) -> Answer:
    """A JSON answer that never ends: ``[`` and then a space every ``pause`` seconds (or as fast as it is read,
    at 0, in pieces of 64 KiB)."""
    return "application/dicom+json", itertools.chain([b"["], itertools.repeat(b" " if pause else b" " * 65536)), pause


def raw(status: str) -> Answer:
    """An empty answer with ``status`` (e.g. ``"503 Service Unavailable"``)."""
    return None, [f"HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n".encode()], 0.0


def dripped_headers(pause: float) -> Answer:
    """A status line, then a header that never ends, a byte every ``pause`` seconds: http.client reads a header
    line up to 64 kB, with requests' timeout between reads."""
    return None, itertools.chain([b"HTTP/1.0 200 OK\r\nX-Slow: "], itertools.repeat(b"a")), pause


@contextmanager
def serving(instances: list[str], answer: Callable[[str], Answer],
            stow: Callable[[], tuple[int, object]] = lambda: (200, {}),
            search: Callable[[str], Answer | None] = lambda level: None,
            most: int | None = None, tls: ssl.SSLContext | None = None) -> Iterator[str]:  # fmt: skip
    """A server on a free local port for as long as the block runs; yields its DICOMweb root URL. Its
    instance search honours ``offset`` and ``limit`` and lists no more than ``most`` in an answer. With
    ``tls`` (a server context holding its certificate), it speaks HTTPS."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, kind: str | None, pieces: Iterable[bytes], pause: float = 0.0, status: int = 200) -> None:
            if kind is not None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.end_headers()
            try:
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    time.sleep(pause)
            except OSError:  # the client stopped reading: what a bounded client is meant to do
                pass

        def do_GET(self) -> None:
            last = self.path.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
            if last in ("studies", "series", "instances") and (given := search(last)) is not None:
                return self.reply(*given)
            if last == "series":
                found = [{"0020000E": {"vr": "UI", "Value": [SERIES]}, "00080060": {"vr": "CS", "Value": ["DX"]}}]
            elif last == "instances":
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                offset, limit = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["1000000"])[0])
                listed = instances[offset:][: min(limit, most or limit)]
                found = [{"00080018": {"vr": "UI", "Value": [name]}} for name in listed]
            else:
                return self.reply(*answer(last))
            self.reply("application/dicom+json", [json.dumps(found).encode()])

        def do_POST(self) -> None:  # STOW-RS: dicomweb-client chunks what is over a megabyte
            if "Content-Length" in self.headers:
                self.rfile.read(int(self.headers["Content-Length"]))
            else:
                while size := int(self.rfile.readline().strip() or b"0", 16):
                    self.rfile.read(size + 2)
                self.rfile.readline()
            status, body = stow()
            if isinstance(body, tuple):  # an Answer
                return self.reply(*body, status=status)
            self.reply("application/dicom+json", [json.dumps(body).encode()], status=status)

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        if tls is not None:  # the handshake is made as a connection is accepted; one that fails is dropped
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/dicom-web"
        finally:
            server.shutdown()
