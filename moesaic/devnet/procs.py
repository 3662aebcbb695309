"""Local servers for the devnet and the tests: anvil, the blob server, stop by pid.

Every server binds 127.0.0.1 on a free port (protocol.ops.net), runs in its own session
(process group) so that stopping it by its pid also stops anything it spawned, and is never
looked up by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from protocol.ops.atomic import write_text_atomic
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


def start_anvil(log: Path, timeout: float = 15.0, attempts: int = 2, started: list | None = None):
    """(process, url) of a fresh anvil (automine) on 127.0.0.1; retried when the free port was
    taken between choosing and binding it. `started` gets the process as it starts (spawn)."""
    for attempt in range(attempts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--silent"]
        with log.open("ab") as out:
            # Own session: if the node wrapper is used, its child is in our process group.
            proc = spawn(cmd, started, stdout=out, stderr=out)
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


def start_blob_server(
    root: Path, allow: list[str], log: Path, attempts: int = 2, started: list | None = None
):
    """(process, url) of `moesaic store serve` on root, writable by the `allow` identities;
    `started` gets the process as it starts (spawn)."""
    root.mkdir(parents=True, exist_ok=True)
    allow_file = root.parent / f"{root.name}.allow"
    allow_file.write_text("\n".join(allow) + "\n")
    for attempt in range(attempts):
        port = free_port()
        cmd = [sys.executable, "-m", "moesaic", "store", "serve", "--root", str(root)]
        cmd += ["--port", str(port), "--allow", str(allow_file)]
        with log.open("ab") as out:
            proc = spawn(cmd, started, stdout=out, stderr=out, cwd=ROOT)
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


def stop_all(started: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop every process in `started` (each its own process group), newest first: SIGTERM to
    all of them at once, then one shared grace period, then SIGKILL for any that linger. One
    signal round for all keeps a dozen processes' shutdown at one grace period, not twelve."""
    alive = [p for p in reversed(started) if p.poll() is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):  # exited since the poll
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in alive:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


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


def record_pids(path: Path, started: list[subprocess.Popen], names: dict[int, str]) -> None:
    """Write {"devnet": our pid, "processes": [{name, pid}]} atomically: every process started,
    named by `names` ({id(proc): name}) or, for a server, by its command line. What an operator
    or a test checks after stopping the devnet; nothing is ever looked up by name."""
    rows = [{"name": names.get(id(p)) or _label(p.args), "pid": p.pid} for p in started]
    doc = {"devnet": os.getpid(), "processes": rows}
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")


def _label(args: list) -> str:
    """anvil, store or dashboard: a server's name from its command line."""
    args = [str(a) for a in args]
    return args[3] if args[1:3] == ["-m", "moesaic"] and len(args) > 3 else Path(args[0]).name


# ----------------------------------------------------------------------------- stopping on a signal


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: raised in the main thread so that every `finally` that stops
    a process runs (a BaseException, like KeyboardInterrupt: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


class StopOnSignals:
    """While active (a context manager, main thread only), SIGTERM and SIGINT raise Stopped.

    Once: a second signal during the cleanup is ignored, so it cannot cut the cleanup short
    (which is bounded: stop_all's grace period, then SIGKILL). Inside `shielded()` the signal is
    held until the block ends: a Popen interrupted after its fork would leave a child that no
    list records, and blocking the signal instead would be inherited by the child's mask.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.pending: int | None = None
        self.depth = 0
        self.previous: dict = {}

    def __enter__(self) -> StopOnSignals:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        if self.depth:
            self.pending = signum
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def shielded(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Stopped(signum)


_ACTIVE: list[StopOnSignals] = []


def spawn(cmd: list[str], started: list | None = None, **popen) -> subprocess.Popen:
    """Popen in its own session (stopped by pid with its group), appended to `started` before a
    StopOnSignals signal can interrupt: whoever stops `started` on the way out stops it too."""
    with _ACTIVE[-1].shielded() if _ACTIVE else contextlib.nullcontext():
        proc = subprocess.Popen(cmd, start_new_session=True, **popen)
        if started is not None:
            started.append(proc)
    return proc
