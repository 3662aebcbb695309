"""Integration fixtures: real local EVM nodes.

- `anvil_url`: an anvil process (from node_modules, pinned in package.json) on 127.0.0.1 and a
  free port, automining one block per transaction; stopped by its pid at the end.
- `pyevm_node`: py-evm in process through eth-tester, no subprocess at all.
- `evm`: parametrised over both, as an `EvmNode` with funded local keys and `mine(n)`, so the
  same test runs on a real JSON-RPC server and on the in-process EVM.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUM_ACCOUNTS = 8


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _start_anvil(log: Path, timeout: float = 15.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--silent"]
    with log.open("ab") as out:
        # Own session: if the node wrapper is used, its child is in our process group.
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"anvil exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            rpc(url, "eth_blockNumber", timeout=1.0)
            return proc, url
        except OSError:
            time.sleep(0.05)
    _stop(proc)
    raise RuntimeError(f"anvil not ready on {url} after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we created (by its leader's pid), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def anvil_url(tmp_path_factory):
    """URL of a fresh anvil (automine) on 127.0.0.1; retried once if the port was taken."""
    log = tmp_path_factory.mktemp("anvil") / "anvil.log"
    try:
        proc, url = _start_anvil(log)
    except RuntimeError:
        proc, url = _start_anvil(log)  # another process grabbed the free port in between
    try:
        yield url
    finally:
        _stop(proc)


@dataclass
class EvmNode:
    """A local EVM chain for tests: web3, funded local keys, and a way to mine empty blocks."""

    name: str
    w3: object
    accounts: list  # eth-account LocalAccounts holding plenty of ether
    _mine: Callable[[int], None] = field(repr=False)

    def mine(self, blocks: int) -> None:
        if blocks > 0:
            self._mine(blocks)

    def mine_to(self, block: int) -> None:
        """Mine so that the next transaction (one block each, automine) lands in `block`."""
        latest = self.w3.eth.block_number
        if latest >= block:
            raise AssertionError(f"already at block {latest}, cannot go back to {block}")
        self.mine(block - 1 - latest)


@pytest.fixture(scope="session")
def anvil_node(anvil_url):
    from eth_account import Account
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(anvil_url, request_kwargs={"timeout": 30}))
    # Deterministic fresh keys funded by the node: the tests sign locally, like real roles.
    accounts = [
        Account.from_key(hashlib.sha256(f"moesaic-test-{i}".encode()).digest())
        for i in range(NUM_ACCOUNTS)
    ]
    for a in accounts:
        rpc(anvil_url, "anvil_setBalance", [a.address, hex(10**24)])
    return EvmNode("anvil", w3, accounts, lambda n: rpc(anvil_url, "anvil_mine", [hex(n)]))


@pytest.fixture(scope="session")
def pyevm_node():
    from eth_account import Account
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider, Web3

    tester = EthereumTester(PyEVMBackend())
    w3 = Web3(EthereumTesterProvider(tester))
    accounts = [Account.from_key(k.to_bytes()) for k in tester.backend.account_keys]
    return EvmNode("pyevm", w3, accounts[:NUM_ACCOUNTS], tester.mine_blocks)


@pytest.fixture(params=["anvil", "pyevm"])
def evm(request) -> EvmNode:
    """Each test using this runs once on anvil (JSON-RPC) and once on in-process py-evm."""
    return request.getfixturevalue(f"{request.param}_node")


# ---------------------------------------------------------------------------- a small trained MoE


@pytest.fixture(scope="session")
def test_base(tmp_path_factory):
    """The `test` preset base, built once per session (treat as read-only)."""
    from moesaic.cli import main

    out = tmp_path_factory.mktemp("shared_base") / "base"
    assert main(["base", "build", "--preset", "test", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def test_assignment(test_base):
    """Math experts of the test base (token-ratio, p=0.3)."""
    from moesaic.cli import main

    out = test_base.parent / "math.json"
    args = ["experts", "select", "--model", str(test_base), "--data", "corpus:math"]
    args += ["--method", "token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def train_honest(test_base, test_assignment):
    """train_honest(out_dir, round) -> two honest deltas (same recipe, data seeds 0 and 1)."""
    from moesaic.cli import main

    def train(out_dir, round):
        paths = []
        for seed in (0, 1):
            out = out_dir / f"honest-{seed}.safetensors"
            args = [
                "miner",
                "train",
                "--model",
                str(test_base),
                "--assignment",
                str(test_assignment),
            ]
            args += ["--data", "corpus:math", "--steps", "16", "--lr", "1e-2", "--batch-size", "4"]
            args += ["--seq-len", "64", "--max-tokens", "20000", "--round", str(round)]
            assert main([*args, "--seed", str(seed), "--out", str(out), "--quiet"]) == 0
            paths.append(out)
        return paths

    return train
