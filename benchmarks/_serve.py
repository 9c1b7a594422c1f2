"""What the benchmarks that start a server or a DICOM node share: a free port, a wait for its health, and
the command-line tools they need."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (another process may take it before use)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Return once ``base``'s ``/api/v1/health`` answers 200; raise if ``server`` ends or ``timeout_s`` passes
    first (the model loads, and may be exported to ONNX, before it listens)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server ended (exit {server.returncode}) before it was healthy")
        try:
            if requests.get(f"{base}/api/v1/health", timeout=1).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {timeout_s:g} s")


def require(*tools: str, package: str) -> None:
    """Stop the benchmark, saying what to install, when a tool it runs is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (Debian: apt-get install {package})")
