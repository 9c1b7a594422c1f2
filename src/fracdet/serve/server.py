"""The application on a socket: uvicorn with request deadlines, and the open-file limit the process may raise.

:func:`run` is what ``fracdet serve`` does; :func:`uvicorn_config` is the same server for a test or a
benchmark that starts it in its own thread. Both give uvicorn :class:`~fracdet.serve.guard.DeadlineH11Protocol`
(a request's headers within ``ServeConfig.header_timeout_s``), so that the app is never put on a socket
without it.
"""

from __future__ import annotations

import functools
import logging
import resource
from typing import Any

import uvicorn
from fastapi import FastAPI

from fracdet.serve.guard import DeadlineH11Protocol

__all__ = ["raise_open_file_limit", "run", "uvicorn_config"]

log = logging.getLogger(__name__)


def uvicorn_config(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` (made by :func:`~fracdet.serve.create_app`, whose ``ServeConfig``
    sets the header deadline); ``options`` are uvicorn's own (``log_level``, ...)."""
    protocol = functools.partial(DeadlineH11Protocol, header_timeout_s=app.state.config.header_timeout_s)
    return uvicorn.Config(app, host=host, port=port, http=protocol, **options)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard one; returns (before, after).

    Every connection holds a file descriptor, and a service starts with a soft limit of 1,024 (systemd's
    default; its hard limit is 524,288), which 1,100 slow clients used up before the header deadline could
    close them: the server could then accept nothing, not even a health check. Raising the soft limit to the
    hard one needs no privilege (Go's runtime does it for every program since 1.19).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a platform's ceiling below the hard limit: keep what there is
            return soft, soft
        return soft, target
    return soft, soft


def run(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted, with the open-file limit raised first."""
    before, after = raise_open_file_limit()
    if after != before:
        log.info("open-file limit raised from %d to %d (one per connection)", before, after)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()
