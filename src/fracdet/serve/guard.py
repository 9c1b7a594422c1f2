"""ASGI middleware that protects the server before any route runs: upload limits and security headers.

:class:`UploadGuard` wraps the request's ``receive`` so that the upload limit holds *while the body
streams in*: a declared ``Content-Length`` over the limit is refused before a byte is read, and a chunked
upload (no length) is cut off as soon as it passes the limit, so no more than the limit is ever spooled to
disk. The same wrapper closes uploads that stall (a client sending one byte a second holds a connection
forever otherwise): each chunk must arrive within ``idle_timeout_s``. Both raise ``HTTPException`` (413,
408), which FastAPI's body parsing passes through to a JSON ``detail``. Once the body is complete,
``receive`` is passed through untouched (Starlette listens on it for disconnects).

:class:`SecurityHeaders` adds the headers a hospital's security review asks for to every response.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SECURITY_HEADERS", "SecurityHeaders", "UploadGuard"]

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


class UploadGuard:
    """Refuse request bodies over ``max_bytes`` (413) and bodies that stall for ``idle_timeout_s`` (408)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, idle_timeout_s: float, limit_text: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.too_large = f"upload too large: limit is {limit_text}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            # refused on the declared length, before a byte is read (outside the routes: answered here)
            await JSONResponse({"detail": self.too_large}, status_code=413)(scope, receive, send)
            return
        received, complete = 0, False

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.idle_timeout_s)
            except TimeoutError:
                raise HTTPException(408, f"upload stalled: no data for {self.idle_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.too_large)
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
