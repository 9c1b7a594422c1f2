"""The PACS node's tests against a real Orthanc and DCMTK run inside a private network namespace.

Orthanc 1.10 listens on every interface, so it is started where there is no interface but loopback:
``unshare -n`` (as root; ``unshare -rn`` maps an unprivileged user to root in a new user namespace), then
``ip link set lo up``. Orthanc, ``fracdet``'s node and the DCMTK clients all run in there, as the pytest
process of ``tests/netns``; this test passes when they do and shows their report when they do not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

NEEDED = ("unshare", "ip", "Orthanc", "storescu", "echoscu")


def _namespace() -> list[str]:
    """How to start a process in a new network namespace here: as root, or as a user mapped to root in a new
    user namespace, or (where unprivileged namespaces are off) through password-less sudo."""
    if os.geteuid() == 0:
        return ["unshare", "-n"]
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False).returncode == 0:
        return ["unshare", "-rn"]
    sudo = shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False)
    if sudo and sudo.returncode == 0:
        return ["sudo", "-n", "-E", "unshare", "-n"]
    pytest.fail("cannot make a network namespace: neither root, unprivileged user namespaces, nor sudo")


def test_the_pacs_node_passes_its_scenarios_against_orthanc_and_dcmtk_in_a_private_network():
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing under CI: {', '.join(missing)} (.ci/run installs orthanc, dcmtk, iproute2)")
        pytest.skip(f"not installed: {', '.join(missing)}")
    pytest.importorskip("pynetdicom")
    namespace = _namespace()
    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -p no:cacheprovider tests/netns"
    run = subprocess.run([*namespace, "sh", "-c", inner], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "FRACDET_IN_NETNS": "1"}, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]
