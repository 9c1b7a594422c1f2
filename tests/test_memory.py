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

#: Allocate a block (40 MiB unless asked), fill it and free it, 20 times on the main thread and on a worker
#: thread each: the minor page faults that cost (each is a page the kernel zero-filled for the process).
SCRIPT = """
import ctypes, json, resource, sys, threading
from fracdet.utils.memory import TRAINING_THRESHOLDS, keep_freed_memory
mode, size = sys.argv[1], int(sys.argv[2])
kept = {"keep": keep_freed_memory, "train": lambda: keep_freed_memory(**TRAINING_THRESHOLDS)}.get(mode, lambda: None)()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def work():
    for _ in range(20):
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
work()
main = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(json.dumps({"kept": kept, "main": main, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str, size: int = 40 << 20, **env: str) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(size)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src"), **env})  # fmt: skip
    return json.loads(run.stdout)


def test_freed_blocks_are_reused_instead_of_mapped_and_zero_filled_again():
    plain, kept = faults("plain"), faults("keep")
    assert kept["kept"] is True
    # as glibc ships, each of the 40 blocks is 10,240 new pages; kept, the blocks are reused (20 times fewer)
    assert kept["faults"] * 10 < plain["faults"]


def test_training_reuses_blocks_the_size_of_a_320_px_batchs_activations():
    size = 96 << 20  # above the audit's 64 MiB; the fused recipe's activations at 320 px reach hundreds of MiB
    plain, audit, train = faults("plain", size), faults("keep", size), faults("train", size)
    assert train["kept"] is True
    # on the main thread, where PyTorch runs a CPU step's forward and backward; a worker thread's arena holds
    # at most 64 MiB, so larger blocks are mapped afresh there whatever the threshold
    assert train["main"] * 10 < plain["main"]
    assert audit["main"] * 10 > plain["main"]  # the audit's 64 MiB threshold would not reach them


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
    assert shell.returncode == 4 and "malloc keeps freed memory: True (blocks up to 64 MiB" in shell.stderr
    with caplog.at_level("DEBUG", logger="fracdet.utils.memory"):  # called from Python: the caller's process
        assert main(["-v", *command]) == 4
    assert "malloc keeps freed memory" not in caplog.text


def test_the_train_command_keeps_freed_memory_with_the_training_thresholds(tmp_path, caplog):
    from fracdet.cli import main

    command = ["train", "--config", str(tmp_path / "missing.yaml"), "--data", str(tmp_path)]
    shell = subprocess.run([sys.executable, "-m", "fracdet", "-v", *command], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    assert shell.returncode != 0 and "malloc keeps freed memory: True (blocks up to 1024 MiB" in shell.stderr
    with caplog.at_level("DEBUG", logger="fracdet.utils.memory"):  # called from Python: the caller's process
        assert main(["-v", *command]) != 0
    assert "malloc keeps freed memory" not in caplog.text
