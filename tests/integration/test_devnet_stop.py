"""`moesaic devnet` stopped by SIGTERM (what `timeout`, a service manager or a CI runner sends) or
Ctrl-C (SIGINT) stops every process it started, by pid, and exits 128 + the signal's number.

.venv/bin/python -m pytest -q tests/integration/test_devnet_stop.py     (~1 min on 2 cores)

The devnet runs as a subprocess with the smallest cast (3 honest miners, 2 validators, a
merger, no cheaters) on a base the session already built; the test waits until every role
process runs, sends the signal to the devnet's pid, and checks that each process the devnet
started (logs/pids.json, cross-checked with /proc's list of its children) is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from storage_fixtures import ROOT

ROLES = {"honest0", "honest1", "honest2", "validator0", "validator1", "merger"}
SERVERS = {"anvil", "store", "dashboard"}


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, exited and not yet reaped by its new parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> set[int]:
    """The pids whose parent is pid (every thread's children, as /proc lists them)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found |= {int(x) for x in (task / "children").read_text().split()}
    return found


def _wait_for_roles(devnet: subprocess.Popen, pids_file: Path, log: Path, timeout: float) -> dict:
    """logs/pids.json once it lists every role process and each of them runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if devnet.poll() is not None:
            pytest.fail(f"the devnet exited {devnet.returncode} early: {log.read_text()[-3000:]}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc = json.loads(pids_file.read_text())
            names = {p["name"] for p in doc["processes"]}
            if names >= ROLES | SERVERS and all(_alive(p["pid"]) for p in doc["processes"]):
                return doc
        time.sleep(0.5)
    pytest.fail(f"the devnet did not start its role processes within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_the_devnet_started(
    tmp_path, test_base, test_assignment, signum
):
    out = tmp_path / "devnet"
    shutil.copytree(test_base, out / "base-test")  # the session's base: no build in the test
    shutil.copyfile(test_assignment, out / "math-test.json")
    log = tmp_path / "devnet.log"
    cmd = [sys.executable, "-m", "moesaic", "devnet", "--rounds", "1", "--preset", "test"]
    cmd += ["--out", str(out)]
    cmd += ["--cheaters", "", "--quiet"]
    with log.open("wb") as sink:
        devnet = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    recorded: list[int] = []
    try:
        doc = _wait_for_roles(devnet, out / "logs" / "pids.json", log, timeout=300)
        assert doc["devnet"] == devnet.pid
        recorded = [p["pid"] for p in doc["processes"]]
        # Every child the devnet has is one it recorded (nothing started off the record).
        assert _children(devnet.pid) <= set(recorded)
        assert len(set(recorded)) == len(ROLES | SERVERS)

        os.kill(devnet.pid, signum)
        code = devnet.wait(timeout=60)
        text = log.read_text()
        assert code == 128 + signum, text[-3000:]
        name = signal.Signals(signum).name
        assert f"devnet: stopped by {name}: all {len(recorded)} processes it started" in text
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in recorded) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in recorded if _alive(p)] == []
    finally:  # whatever failed above: nothing of this test keeps running (by pid, never by name)
        if devnet.poll() is None:
            devnet.kill()
            devnet.wait(timeout=10)
        for pid in recorded:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
