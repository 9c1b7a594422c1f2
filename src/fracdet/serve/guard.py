"""What protects the server before any route runs: request deadlines, upload limits and security headers.

:class:`DeadlineH11Protocol` is uvicorn's HTTP/1.1 protocol with a deadline on each request's line and
headers. uvicorn has none: its keep-alive timer is reset by every byte, so a client that sends a header
line every few seconds holds its connection for ever, and ASGI middleware cannot help, since it runs only
once the headers are complete. 1,100 such clients took every file descriptor of a server started with the
usual limit of 1,024 (a systemd service's): health checks timed out for as long as they stayed, and asyncio
logged 1.7 million lines of ``Too many open files`` in 40 s (``benchmarks/slow_clients.py``). A request whose
headers have not arrived within ``header_timeout_s`` now gets a 408 and its connection is closed, as
nginx's ``client_header_timeout`` does.

:class:`UploadGuard` wraps the request's ``receive`` so that the upload limit holds *while the body
streams in*: a declared ``Content-Length`` over the limit is refused before a byte is read, and a chunked
upload (no length) is cut off as soon as it passes the limit, so no more than the limit is ever spooled to
disk. The same wrapper closes uploads that stall or trickle: each chunk must arrive within
``idle_timeout_s``, and the body as a whole at :data:`MIN_UPLOAD_RATE` at least after that grace (Apache's
``mod_reqtimeout`` rule), so a byte every few seconds cannot hold a connection either. Both raise
``HTTPException`` (413, 408), which FastAPI's body parsing passes through to a JSON ``detail``, and close
the connection. Once the body is complete, ``receive`` is passed through untouched (Starlette listens on it
for disconnects).

:class:`SecurityHeaders` adds the headers a hospital's security review asks for to every response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT_S", "MIN_UPLOAD_RATE", "SECURITY_HEADERS", "DeadlineH11Protocol", "SecurityHeaders",
           "UploadGuard"]  # fmt: skip

log = logging.getLogger(__name__)

#: How long a request's line and headers may take to arrive (nginx's ``client_header_timeout`` is 60 s;
#: a browser or client sends them in one packet, in milliseconds).
HEADER_TIMEOUT_S = 10.0
#: On every refusal of a body not read to its end: the rest of it must not be read as the next request, nor
#: hold the connection (a trickling client kept it after its 408, and its bytes reset uvicorn's keep-alive).
CLOSE = {"Connection": "close"}
#: The slowest an upload may arrive once its first ``idle_timeout_s`` are over, in bytes per second: 4 kbit/s,
#: Apache's default; a 50 MB radiograph over a 1 Mbit/s line arrives at 125,000.
MIN_UPLOAD_RATE = 500

#: Sent with every response. The page is self-contained (inline script and style, images as data: URLs).
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
}


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with ``header_timeout_s`` for each request's line and headers.

    The deadline runs from the moment the connection opens, and on a kept-alive connection from the end of
    the previous response; it ends when the request's headers are complete (the body is then the
    :class:`UploadGuard`'s). A client that sent part of a request by then gets a 408; one that sent nothing
    is closed, as uvicorn closes an idle kept-alive connection. Give it to uvicorn as
    ``http=functools.partial(DeadlineH11Protocol, header_timeout_s=...)``
    (:func:`fracdet.serve.server.uvicorn_config` does).
    """

    def __init__(self, *args: Any, header_timeout_s: float = HEADER_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited_after: object = None  # the request cycle before the one awaited (None: the first)
        self._partial = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:
            self._partial = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._awaited_after:
            self._disarm()  # the headers are complete: the body has the upload guard's limits

    def on_response_complete(self) -> None:
        self._await_request()  # first: uvicorn may start a pipelined request at once, which disarms it
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._disarm()
        self._awaited_after, self._partial = self.cycle, False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._awaited_after:
            return
        if self._partial:  # h11 cannot answer a request it has not parsed: the 408 is written as it is
            body = json.dumps({"detail": f"request headers took over {self.header_timeout_s:g} s"}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            _late.count(self.header_timeout_s)
        self.transport.close()  # uvicorn's connection_lost tells h11


class _LateRequests:
    """Counts connections closed for late headers and logs them at most once a minute (the first at once): a
    client that trickles is likely one of many, and a line for each would flood the log the deadline protects."""

    def __init__(self) -> None:
        self.closed, self.logged = 0, -float("inf")

    def count(self, timeout_s: float) -> None:  # the event loop's thread only: no lock needed
        self.closed += 1
        if (now := time.monotonic()) - self.logged >= 60:
            log.warning("closed %d connection(s) whose request headers took over %g s (slow or stalled clients)",
                        self.closed, timeout_s)  # fmt: skip
            self.closed, self.logged = 0, now


_late = _LateRequests()


class UploadGuard:
    """Refuse request bodies over ``max_bytes`` (413), and bodies that stall for ``idle_timeout_s`` or arrive
    slower than ``min_rate`` bytes per second after it (408)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, idle_timeout_s: float, limit_text: str,
                 min_rate: float = MIN_UPLOAD_RATE) -> None:  # fmt: skip
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate
        self.too_large = f"upload too large: limit is {limit_text}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # refused on the declared length, before a byte is read (outside the routes: answered here)
            await JSONResponse({"detail": self.too_large}, status_code=413, headers=CLOSE)(scope, receive, send)
            return
        received, complete = 0, False
        started = time.monotonic()

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            # the grace, then a second for every `min_rate` bytes: a byte every few seconds runs out of time
            left = started + self.idle_timeout_s + received / self.min_rate - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), min(self.idle_timeout_s, left))
            except TimeoutError:
                if left < self.idle_timeout_s:
                    raise HTTPException(408, f"upload too slow: under {self.min_rate:g} bytes/s", CLOSE) from None
                raise HTTPException(408, f"upload stalled: no data for {self.idle_timeout_s:g} s", CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.too_large, CLOSE)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)


class SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)
