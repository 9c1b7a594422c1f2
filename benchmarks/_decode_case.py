"""Decode one file in a process of its own, under an address-space cap, for benchmarks that try hostile files:
a case that would take the machine's memory fails inside its process, and one that kills its process (a
codec's abort) is reported as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: Run in the child: cap the address space, decode, print what happened, the time and the peak RSS as JSON.
CHILD = """
import json, resource, sys, time
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from fracdet.data.decode import decode_image
data = open(sys.argv[1], "rb").read()
start = time.perf_counter()
try:
    outcome = "read %dx%d" % decode_image(data, name="case").pixels.shape[::-1][-2:]
except BaseException as exc:
    outcome = "%s: %s" % (type(exc).__name__, str(exc).replace("case: ", "")[:160])
seconds = round(time.perf_counter() - start, 3)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent, VmHWM is this image's own
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_rss_mb": peak // 1024}))
"""


def decode_case(data: bytes, cap: int, *, src: Path | None = None, timeout: float = 900) -> dict:
    """What decoding ``data`` did under ``cap`` bytes of address space: ``outcome`` (read, refused and why,
    killed and by which signal, or still decoding at ``timeout``), ``seconds`` and ``peak_rss_mb``; with the
    code under ``src`` (another revision's ``src``), else the installed fracdet."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    with tempfile.NamedTemporaryFile() as fh:
        fh.write(data)
        fh.flush()
        try:
            run = subprocess.run([sys.executable, "-c", CHILD, fh.name, str(cap)], capture_output=True, text=True,
                                 env=env, check=False, timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"outcome": f"still decoding after {timeout:g} s"}
    if run.returncode < 0:
        return {"outcome": f"process killed by {signal.Signals(-run.returncode).name}",
                "stderr": run.stderr.strip()[-200:]}  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])
