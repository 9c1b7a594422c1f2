"""A benchmark's setting run in a process of its own, so that what the kernel counts of it is its own alone."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finished:
    """How a child ended, what it printed and what ``wait4`` counted of it (the child alone, not this process).

    ``peak_rss_gib`` is the child's ``ru_maxrss``: Linux starts it from the forking parent's, so it is only
    meaningful where the child grows well past this small driver (gigabytes against its ~100 MiB).
    """

    exit_code: int
    stdout: str
    wall_s: float
    user_s: float
    kernel_s: float
    minor_faults: int
    context_switches: int
    peak_rss_gib: float

    def counts(self) -> dict[str, float]:
        """Its times, faults and peak memory, as a benchmark's row records them."""
        return {"wall_s": self.wall_s, "user_s": self.user_s, "kernel_s": self.kernel_s,
                "minor_faults": self.minor_faults, "peak_rss_gib": self.peak_rss_gib}  # fmt: skip

    def reported(self) -> dict:
        """The JSON object a benchmark's child prints as its last line."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_measured(command: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 stderr: bool = False) -> Finished:  # fmt: skip
    """Run ``command`` to its end and measure it; its standard error is dropped unless ``stderr``."""
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=None if stderr else subprocess.DEVNULL,
                               text=True, env=env, cwd=cwd)  # fmt: skip
    out = process.stdout.read()
    process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = exit_code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return Finished(exit_code, out, time.perf_counter() - began, usage.ru_utime, usage.ru_stime, usage.ru_minflt,
                    usage.ru_nvcsw + usage.ru_nivcsw, usage.ru_maxrss / 2**20)  # fmt: skip
