"""Integration fixtures: real local EVM nodes.

- `anvil_url`: an anvil process (from node_modules, pinned in package.json) on 127.0.0.1 and a
  free port, automining one block per transaction; stopped by its pid at the end.
- `pyevm_node`: py-evm in process through eth-tester, no subprocess at all.
- `evm`: parametrised over both, as an `EvmNode` with funded local keys and `mine(n)`, so the
  same test runs on a real JSON-RPC server and on the in-process EVM.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moesaic.devnet.procs import (  # noqa: F401 (re-exported: the tests import them here)
    anvil_binary,
    free_port,
    rpc,
    start_anvil,
    stop,
)

ROOT = Path(__file__).resolve().parents[2]
NUM_ACCOUNTS = 8


@pytest.fixture(scope="session")
def anvil_url(tmp_path_factory):
    """URL of a fresh anvil (automine) on 127.0.0.1; retried once if the port was taken."""
    log = tmp_path_factory.mktemp("anvil") / "anvil.log"
    proc, url = start_anvil(log)  # retried once if another process grabbed the free port
    try:
        yield url
    finally:
        stop(proc)


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
