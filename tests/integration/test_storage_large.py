"""1 GiB through the blob server with bounded memory on both ends (marked slow).

The server is `moesaic store serve` in its own process; the uploader and the downloader are
two more child processes, each reporting its own peak RSS (VmHWM) and time. The server's
peak is its VmHWM from /proc. Every peak must stay far below the object size: nothing on the
path may buffer a whole object.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from storage_fixtures import ETH_KEY, ROOT, running_blob_server

SIZE = 1 << 30
MIB = 1 << 20
PEAK_LIMIT_MIB = 300

CHILD = r"""
import json, sys, time
from protocol.storage.auth import load_signer
from protocol.storage.http import HttpStore
action, url, key, path, sha, size = sys.argv[1:]
store = HttpStore(url, signer=load_signer(key))
t0 = time.perf_counter()
if action == "put":
    ref = store.put(path)
    assert (ref.sha256, ref.size) == (sha, int(size)), ref
else:
    store.get(sha, path, expected_sha256=sha, max_bytes=int(size))
seconds = time.perf_counter() - t0
# VmHWM, not getrusage: Linux carries ru_maxrss across exec, so a child forked from a large
# pytest process would report the parent's peak. VmHWM belongs to this address space only.
with open("/proc/self/status") as f:
    peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024}))
"""


def write_random(path, size: int) -> str:
    """size bytes in distinct 1 MiB blocks, written block by block; returns their sha256."""
    h, base = hashlib.sha256(), os.urandom(MIB)
    with path.open("wb") as f:
        for i in range(0, size, MIB):
            block = i.to_bytes(8, "little") + base[8:]
            f.write(block)
            h.update(block)
    return h.hexdigest()


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set of a live process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def run_child(action: str, url: str, path, sha: str) -> dict:
    args = [sys.executable, "-c", CHILD, action, url, ETH_KEY, str(path), sha, str(SIZE)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_gib_round_trip_in_bounded_memory(tmp_path):
    src, dest = tmp_path / "src.bin", tmp_path / "dest.bin"
    sha = write_random(src, SIZE)
    with running_blob_server(tmp_path / "root") as srv:
        put = run_child("put", srv.url, src, sha)
        src.unlink()  # one fewer GiB on disk; the digest is all we need from it
        get = run_child("get", srv.url, dest, sha)
        server_peak = vm_hwm_mib(srv.pid)
    assert dest.stat().st_size == SIZE and not (tmp_path / "dest.bin.part").exists()
    print(
        f"\n1 GiB via the blob server: put {SIZE / MIB / put['seconds']:.0f} MiB/s "
        f"(hash + upload, peak RSS {put['peak_mib']:.0f} MiB), get "
        f"{SIZE / MIB / get['seconds']:.0f} MiB/s (download + verify, peak RSS "
        f"{get['peak_mib']:.0f} MiB), server peak RSS {server_peak:.0f} MiB"
    )
    for who, peak in (("uploader", put["peak_mib"]), ("downloader", get["peak_mib"])):
        assert peak < PEAK_LIMIT_MIB, f"{who} peaked at {peak:.0f} MiB"
    assert server_peak < PEAK_LIMIT_MIB, f"server peaked at {server_peak:.0f} MiB"
