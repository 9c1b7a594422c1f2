"""A batch command's process reuses the memory it frees (fracdet.utils.memory)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")

#: Allocate a 40 MiB block, fill it and free it, 20 times on the main thread and on a worker thread each:
#: the minor page faults that cost (each is a page the kernel zero-filled for the process).
SCRIPT = """
import ctypes, json, resource, sys, threading
from fracdet.utils.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def work(size=40 << 20):
    for _ in range(20):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
work()
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(json.dumps({"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str, **env: str) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env})  # fmt: skip
    return json.loads(run.stdout)


def test_freed_blocks_are_reused_instead_of_mapped_and_zero_filled_again():
    plain, kept = faults("plain"), faults("keep")
    assert kept["kept"] is True
    # as glibc ships, each of the 40 blocks is 10,240 new pages; kept, the blocks are reused (20 times fewer)
    assert kept["faults"] * 10 < plain["faults"]


def test_a_users_own_malloc_settings_are_left_alone():
    assert faults("keep", MALLOC_TRIM_THRESHOLD_="0")["kept"] is False


def unreadable_dataset(root):
    for label in ("Fractured", "Non_fractured"):
        (root / label).mkdir(parents=True)
        (root / label / "0.jpg").write_bytes(b"not a jpeg")
    return str(root)


def test_the_audit_command_keeps_freed_memory_in_its_own_process_only(tmp_path, caplog):
    from fracdet.cli import main

    command = ["audit", unreadable_dataset(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]
    shell = subprocess.run([sys.executable, "-m", "fracdet", "-v", *command], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert shell.returncode == 4 and "malloc keeps freed memory: True" in shell.stderr
    with caplog.at_level("DEBUG", logger="fracdet.utils.memory"):  # called from Python: the caller's process
        assert main(["-v", *command]) == 4
    assert "malloc keeps freed memory" not in caplog.text
