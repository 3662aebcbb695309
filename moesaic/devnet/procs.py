"""Local servers for the devnet and the tests: anvil, the blob server, stop by pid.

Every server binds 127.0.0.1 on a free port (protocol.ops.net), runs in its own session
(process group) so that stopping it by its pid also stops anything it spawned, and is never
looked up by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from protocol.ops.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def rpc(url: str, method: str, params: list | None = None, timeout: float = 5.0):
    """One JSON-RPC call without web3: readiness checks must not depend on the code under test."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        doc = json.loads(resp.read())
    if "error" in doc:
        raise RuntimeError(f"{method}: {doc['error']}")
    return doc["result"]


def anvil_binary() -> Path:
    """The platform binary inside the npm package, else the node wrapper in node_modules/.bin.

    The binary itself is preferred: one process whose pid is the server's, so stopping it by
    pid cannot leave an orphan behind a wrapper.
    """
    for path in sorted((ROOT / "node_modules" / "@foundry-rs").glob("anvil-*/bin/anvil")):
        if os.access(path, os.X_OK):
            return path
    wrapper = ROOT / "node_modules" / ".bin" / "anvil"
    if not wrapper.exists():
        raise FileNotFoundError(f"{wrapper} missing: run scripts/env.sh (npm install)")
    return wrapper


def start_anvil(log: Path, timeout: float = 15.0, attempts: int = 2):
    """(process, url) of a fresh anvil (automine) on 127.0.0.1; retried when the free port was
    taken between choosing and binding it."""
    for attempt in range(attempts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--silent"]
        with log.open("ab") as out:
            # Own session: if the node wrapper is used, its child is in our process group.
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rpc(url, "eth_blockNumber", timeout=1.0)
                return proc, url
            except OSError:
                time.sleep(0.05)
        stop(proc)
        if attempt == attempts - 1:
            raise RuntimeError(f"anvil did not start on {url}: {log.read_text()[-2000:]}")
    raise AssertionError("unreachable")


def start_blob_server(root: Path, allow: list[str], log: Path, attempts: int = 2):
    """(process, url) of `moesaic store serve` on root, writable by the `allow` identities."""
    root.mkdir(parents=True, exist_ok=True)
    allow_file = root.parent / f"{root.name}.allow"
    allow_file.write_text("\n".join(allow) + "\n")
    for attempt in range(attempts):
        port = free_port()
        cmd = [sys.executable, "-m", "moesaic", "store", "serve", "--root", str(root)]
        cmd += ["--port", str(port), "--allow", str(allow_file)]
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, cwd=ROOT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, log)
            return proc, f"http://127.0.0.1:{port}"
        except RuntimeError:
            stop(proc)
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    """Poll url until it answers (any HTTP status), or fail with the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[:4]} exited {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=1.0).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we created (by its leader's pid), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:  # it exited between the poll and the signal
        proc.wait(timeout=5)
