"""A real subtensor runtime for tests: chopsticks running the spec-293 subtensor runtime.

    from chopsticks import running_chopsticks, sudo
    with running_chopsticks(tmp_path) as node:   # RPC ready in 3-20 s (busy machine)
        sudo(alice_chain, "sudo_set_network_rate_limit", {"rate_limit": 0})
        node.new_blocks(12)

chopsticks (npm, pinned in package.json) executes the subtensor runtime inside the chain spec
`tests/data/chain/raw_spec_subtensor_293_aura_dev.json` (spec_version 293, July 2025; its
origin: tests/data/chain/README.md) on 127.0.0.1 and a free port, building one block per
extrinsic (`Instant`). Flags: `--allow-unresolved-imports` (the spec's stubbed drand host
calls), `--timestamp` now (else block 1 races the wall clock). Genesis: sudo and only Aura
author Alice; Alice, Bob, Charlie hold 1,000,000 TAO. It runs without `--db`: state lives in
memory, nothing is cached from a remote chain, and the sqlite3 native module is never loaded.
The process is started in its own session and stopped by its pid (SIGTERM, then SIGKILL).
A block takes about 1 s to build on a busy machine (a tempo-10 epoch: ~10 s).

The module-scoped pytest fixture `chopsticks_node` is imported by test files that need it
(tests/integration/conftest.py belongs to the EVM harness).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from moesaic.devnet.procs import free_port, rpc

ROOT = Path(__file__).resolve().parents[2]
CHAIN_SPEC = ROOT / "tests" / "data" / "chain" / "raw_spec_subtensor_293_aura_dev.json"
FUND = 10**15  # rao (1e6 TAO); dev_setStorage takes JSON numbers, so stay below 2**53
START_TIMEOUT = 90.0  # the first start compiles the runtime wasm: seconds on a busy machine


def http_rpc(url: str, method: str, params: list | None = None, timeout: float = 30.0):
    """One JSON-RPC call over HTTP, independent of substrate-interface (the code under test)."""
    return rpc(url, method, params, timeout=timeout)


@dataclass
class Chopsticks:
    """A running chopsticks node and its dev RPCs."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rpc(self, method: str, params: list | None = None, timeout: float = 30.0):
        return http_rpc(self.http_url, method, params, timeout=timeout)

    def head(self) -> int:
        return int(self.rpc("chain_getHeader")["number"], 16)

    def set_storage(self, changes: dict) -> None:
        """dev_setStorage: {"Pallet": {"Item": value | [[[keys...], value], ...]}}."""
        self.rpc("dev_setStorage", [changes])

    def new_blocks(self, count: int = 1) -> None:
        """Build `count` empty blocks (each runs on_initialize: epochs, emission)."""
        if count > 0:  # ~1 s a block on a busy machine: allow 5
            self.rpc("dev_newBlock", [{"count": count}], timeout=30.0 + 5.0 * count)

    def fund(self, addresses: list[str], amount: int = FUND) -> None:
        accounts = [[[a], {"providers": 1, "data": {"free": amount}}] for a in addresses]
        self.set_storage({"System": {"Account": accounts}})

    def set_sudo(self, address: str) -> None:
        self.set_storage({"Sudo": {"Key": address}})


def start_chopsticks(workdir: Path, timeout: float = START_TIMEOUT) -> Chopsticks:
    """Start chopsticks on a free 127.0.0.1 port and wait until its RPC answers."""
    exe = ROOT / "node_modules" / ".bin" / "chopsticks"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} missing: run scripts/env.sh (npm install)")
    if not CHAIN_SPEC.exists():
        raise FileNotFoundError(f"{CHAIN_SPEC} missing: the chain spec ships in the repository")
    port, log = free_port(), workdir / "chopsticks.log"
    cmd = [str(exe), "--chain-spec", str(CHAIN_SPEC), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--build-block-mode", "Instant", "--allow-unresolved-imports"]
    cmd += ["--timestamp", str(int(time.time() * 1000))]
    with log.open("ab") as out:
        # Own session: stopping the group by the leader's pid reaches any child it starts.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    node = Chopsticks(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"chopsticks exited with {proc.returncode}: {log.read_text()[-3000:]}"
            )
        try:
            node.head()
            return node
        except OSError:
            time.sleep(0.1)
    stop_chopsticks(proc)
    raise RuntimeError(f"chopsticks not ready on port {port} after {timeout} s; see {log}")


def stop_chopsticks(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we created (by its leader's pid), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def sudo(chain, function: str, params: dict, module: str = "AdminUtils") -> int:
    """Run module.function as root through Sudo.sudo, signed by `chain` (holding the sudo key).

    Subnet hyperparameters are set through AdminUtils on this runtime (sudo_set_tempo, ...).

    Sudo.sudo itself succeeds when the inner call fails: the verdict is in its Sudid event.
    """
    inner = {"call_module": module, "call_function": function, "call_args": params}
    landed = chain.submit("Sudo", "sudo", {"call": inner})
    for pallet, event, attributes in landed.events:
        if (pallet, event) == ("Sudo", "Sudid"):
            result = attributes["sudo_result"] if isinstance(attributes, dict) else attributes[0]
            if "Err" in result:
                raise RuntimeError(f"sudo {module}.{function}({params}) failed: {result['Err']}")
    return landed.block


@contextmanager
def running_chopsticks(workdir: Path) -> Iterator[Chopsticks]:
    try:
        node = start_chopsticks(workdir)
    except RuntimeError as e:
        if "EADDRINUSE" not in str(e):
            raise
        node = start_chopsticks(workdir)  # another process took the free port in between
    try:
        yield node
    finally:
        stop_chopsticks(node.proc)


@pytest.fixture(scope="module")
def chopsticks_node(tmp_path_factory) -> Iterator[Chopsticks]:
    """One chopsticks node per test module (a few seconds to start)."""
    with running_chopsticks(tmp_path_factory.mktemp("chopsticks")) as node:
        yield node
