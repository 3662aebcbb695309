"""The gas test: with 10,000 members and 5,000 checkpoints, every call a role makes stays under
a fixed gas figure, and reading the same data in one call (the old `members()` and
`checkpoints()`) would not have fitted in a block.

How the state is made, fast and honestly: the registry is deployed on its own anvil whose
genesis block is 100,000 (round ~5,263 of a 19-block schedule), so 5,000 past rounds exist
without mining 95,000 blocks (anvil mines about 250 empty blocks a second here). Real
transactions register six members (four validators, two miners), commit in one round and
publish that round's checkpoint; the storage those transactions wrote is read back and must
equal what `Layout` predicts for them (the layout proof). Then `Layout` writes 10,000 more
members and 5,000 earlier checkpoints with `anvil_setStorageAt` (batched: ~3 s), and the
contract's own views must read them back correctly. Everything measured afterwards (eth_estimateGas
of each view and transaction, in the phase where it is valid) runs the real contract code on
that state.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
import requests
from eth_account import Account
from eth_utils import keccak
from web3 import Web3

from moesaic.devnet.procs import anvil_binary, free_port, stop
from protocol.chain.evm import (
    MAX_WEIGHTS,
    PAGE,
    EvmChain,
    capped_u16_weights,
    deploy_registry,
    weights_hash,
)
from protocol.round.schedule import Schedule, phase_bounds, position

GENESIS = 100_000
LENGTHS = (2, 4, 1, 6, 4, 2)  # train, commit, reveal, evaluate, weights, merge: 19 blocks
SYBILS, PAST_CHECKPOINTS, SYBIL_COMMITS = 10_000, 5_000, 300
VIEW_GAS = 3_000_000  # every read a role makes costs less than this, whatever the history
TX_GAS = 6_000_000  # every transaction (setWeights of MAX_WEIGHTS uids is the largest)
BLOCK_GAS = 30_000_000  # a block's gas, and the eth_call cap of most nodes
# Storage slots of MoesaicRegistry's state variables, in declaration order (constants and
# immutables take none). The layout proof below fails if any of these is wrong.
SLOT = dict(members=2, uid_plus_one=4, commitments=7, checkpoint_of=12, published_rounds=13)


def _word(x: int) -> bytes:
    return x.to_bytes(32, "big")


def _at(key: int, slot: int) -> int:
    """The slot of mapping[key] for a mapping declared at `slot`."""
    return int.from_bytes(keccak(_word(key) + _word(slot)), "big")


def _data(slot: int) -> int:
    """The first slot of a dynamic array's data whose length is at `slot`."""
    return int.from_bytes(keccak(_word(slot)), "big")


class Layout:
    """Slot -> value of the registry's records, as solc lays them out (see SLOT)."""

    @staticmethod
    def member(uid: int, account: str, miner: bool, validator: bool, bond: int = 0) -> dict:
        a = int(account, 16)
        first = _data(SLOT["members"]) + 2 * uid
        return {
            first: a | int(miner) << 160 | int(validator) << 168,
            first + 1: bond,
            _at(a, SLOT["uid_plus_one"]): uid + 1,
        }

    @staticmethod
    def commitment(rnd: int, i: int, miner: str, uid: int, block: int, digest: bytes) -> dict:
        first = _data(_at(rnd, SLOT["commitments"])) + 2 * i
        return {first: int(miner, 16) | uid << 160 | block << 176, first + 1: int(digest.hex(), 16)}

    @staticmethod
    def checkpoint(rnd: int, digest: bytes, uri: str, deltas: bytes, block: int, who: str):
        assert len(uri) < 32  # a short string lives in its slot: bytes, then length * 2
        base = _at(rnd, SLOT["checkpoint_of"])
        text = int.from_bytes(uri.encode().ljust(31, b"\0") + bytes([2 * len(uri)]), "big")
        return {
            base: rnd,
            base + 1: int(digest.hex(), 16),
            base + 2: text,
            base + 3: int(deltas.hex(), 16),
            base + 4: block | int(who, 16) << 64,
        }

    @staticmethod
    def published(rounds: list[int]) -> dict:
        first = _data(SLOT["published_rounds"])
        return {SLOT["published_rounds"]: len(rounds)} | {
            first + i: r for i, r in enumerate(rounds)
        }


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class Node:
    """A dedicated anvil (genesis block GENESIS) and batched raw JSON-RPC to it."""

    def __init__(self, log: Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--silent"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--number", str(GENESIS)], stdout=out, stderr=out, start_new_session=True
            )
        self.session = requests.Session()
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("eth_blockNumber")
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    stop(self.proc)
                    raise RuntimeError(f"anvil did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        self.w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 60}))

    def batch(self, calls: list[tuple[str, list]]) -> list:
        body = [
            {"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)
        ]
        answers = self.session.post(self.url, json=body, timeout=120).json()
        errors = [a["error"] for a in answers if "error" in a]
        assert not errors, errors[:3]
        return [a["result"] for a in sorted(answers, key=lambda a: a["id"])]

    def call(self, method: str, params: list | None = None):
        return self.batch([(method, params or [])])[0]

    def write(self, address: str, slots: dict, chunk: int = 2000) -> None:
        items = [
            ("anvil_setStorageAt", [address, hex(k), "0x" + _word(v).hex()])
            for k, v in slots.items()
        ]
        for i in range(0, len(items), chunk):
            self.batch(items[i : i + chunk])

    def read(self, address: str, slots: list[int]) -> dict:
        got = self.batch([("eth_getStorageAt", [address, hex(s), "latest"]) for s in slots])
        return {s: int(v, 16) for s, v in zip(slots, got, strict=True)}

    def mine_to(self, block: int) -> None:
        """The next transaction (automine) lands in `block`."""
        head = int(self.call("eth_blockNumber"), 16)
        assert head < block, (head, block)
        if block - 1 > head:
            self.call("anvil_mine", [hex(block - 1 - head)])

    def gas(self, sender: str, to: str, data: str) -> int:
        tx = {"from": sender, "to": to, "data": data, "gas": hex(BLOCK_GAS)}
        return int(self.call("eth_estimateGas", [tx, "pending"]), 16)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("gas") / "anvil.log")
    try:
        yield n
    finally:
        stop(n.proc)


def test_every_role_call_stays_under_a_fixed_gas_figure(node):
    started = time.monotonic()
    keys = [
        Account.from_key(hashlib.sha256(f"moesaic-gas-{i}".encode()).digest()) for i in range(9)
    ]
    node.batch([("anvil_setBalance", [k.address, hex(10**24)]) for k in keys])
    owner, validators, miners, newcomer = keys[0], keys[1:5], keys[5:7], keys[7]
    schedule = Schedule(0, *LENGTHS)
    registry = deploy_registry(node.w3, owner, schedule, bond=0)
    chain = {k.address: EvmChain(node.w3, registry, k, timeout=60) for k in keys}
    admin, fns = chain[owner.address], chain[owner.address].contract.functions
    for v in validators:
        admin.authorise_validator(v.address)  # uids 0-3
    for m in miners:
        chain[m.address].register()  # uids 4-5
    admin.publish_task(*(_digest(x).hex() for x in ("base", "assignment", "data")), "file:///task")
    now = position(schedule, node.w3.eth.block_number + 1)
    r = now.round + 1  # a whole round ahead: real commitments and a checkpoint, then measure
    m = r + 1

    # -- real transactions of round r, and the layout proof on what they wrote
    node.mine_to(phase_bounds(schedule, r, "commit")[0])
    blocks = [chain[k.address].commit(r, _digest(f"c{i}").hex()) for i, k in enumerate(miners)]
    node.mine_to(phase_bounds(schedule, r, "merge")[0])
    cp_block = admin.publish_checkpoint(r, _digest("ck").hex(), "file:///ck", _digest("dd").hex())
    predicted = {}
    for uid, k in enumerate(validators):
        predicted |= Layout.member(uid, k.address, miner=False, validator=True)
    for i, k in enumerate(miners):
        predicted |= Layout.member(4 + i, k.address, miner=True, validator=False)
        predicted |= Layout.commitment(r, i, k.address, 4 + i, blocks[i], _digest(f"c{i}"))
    predicted |= Layout.checkpoint(
        r, _digest("ck"), "file:///ck", _digest("dd"), cp_block, owner.address
    )
    predicted |= Layout.published([r])
    assert node.read(registry, list(predicted)) == predicted, "the storage layout is not Layout's"

    # -- 10,000 sybil members, 5,000 earlier checkpoints, 300 sybil commitments in round m
    sybil = lambda i: Web3.to_checksum_address(f"0x{0x5EB1 << 100 | i:040x}")  # noqa: E731
    writes = {SLOT["members"]: 6 + SYBILS}
    for i in range(SYBILS):
        writes |= Layout.member(6 + i, sybil(i), miner=True, validator=False)
    past = list(range(r - PAST_CHECKPOINTS, r))
    for q in past:
        merge = phase_bounds(schedule, q, "merge")[0]
        writes |= Layout.checkpoint(
            q, _digest(f"m{q}"), f"file:///ck/{q}", _digest("d"), merge, owner.address
        )
    writes |= Layout.published([*past, r])
    commit_block = phase_bounds(schedule, m, "commit")[0]
    writes[_at(m, SLOT["commitments"])] = SYBIL_COMMITS
    for i in range(SYBIL_COMMITS):
        writes |= Layout.commitment(m, i, sybil(i), 6 + i, commit_block, _digest(f"s{i}"))
    node.write(registry, writes)
    # The contract reads the written records back as it reads its own.
    assert fns.memberCount().call() == 6 + SYBILS
    assert [tuple(row[:2]) for row in fns.membersPage(6 + SYBILS - 2, 5).call()] == [
        (6 + SYBILS - 2, sybil(SYBILS - 2)), (6 + SYBILS - 1, sybil(SYBILS - 1))
    ]  # fmt: skip
    assert tuple(fns.uidOf(sybil(1234)).call()) == (True, 6 + 1234)
    assert fns.checkpointCount().call() == PAST_CHECKPOINTS + 1
    mid = r - PAST_CHECKPOINTS // 2
    assert admin.checkpoint(mid).uri == f"file:///ck/{mid}"
    assert admin.latest_checkpoint(before_round=mid).round == mid - 1
    assert admin.latest_checkpoint().round == r

    # -- round m: every transaction a role sends, estimated in its phase
    view = EvmChain(node.w3, registry, call_gas=VIEW_GAS)  # the roles' reads, capped
    figures: dict[str, int] = {}
    call = lambda name, fn, sender=owner: figures.__setitem__(  # noqa: E731
        name, node.gas(sender.address, registry, fn._encode_transaction_data())
    )
    node.mine_to(commit_block)
    call("commit", fns.commit(m, _digest("c")), miners[0])
    call("register", fns.register(), newcomer)
    node.mine_to(phase_bounds(schedule, m, "evaluate")[0])
    uids = list(range(6, 6 + MAX_WEIGHTS))  # the largest weight vector the contract takes
    weights = [float(1 + i % 7) for i in range(MAX_WEIGHTS)]
    salt = b"\x11" * 32
    us, ws = capped_u16_weights(uids, weights)
    call(
        "commitWeights",
        fns.commitWeights(m, weights_hash(m, validators[0].address, us, ws, salt)),
        validators[0],
    )
    for v in validators:
        chain[v.address].commit_weights(m, uids, weights, salt)
    node.mine_to(phase_bounds(schedule, m, "weights")[0])
    call("setWeights", fns.setWeights(m, us, ws, salt), validators[0])
    for v in validators:
        chain[v.address].set_weights(m, uids, weights, salt)
    node.mine_to(phase_bounds(schedule, m, "merge")[0])
    call("publishCheckpoint", fns.publishCheckpoint(m, _digest("n"), "file:///n", _digest("d")))

    # -- every read a role makes, on the full history
    pages = [node.gas(owner.address, registry, fns.membersPage(s, PAGE)._encode_transaction_data())
             for s in range(0, 6 + SYBILS, PAGE)]  # fmt: skip
    figures["membersPage (max)"] = max(pages)
    for name, fn in {
        "memberCount": fns.memberCount(),
        "uidOf": fns.uidOf(sybil(9999)),
        "commitmentCount": fns.commitmentCount(m),
        "commitmentsPage": fns.commitmentsPage(m, 0, PAGE),
        "weightSetCount": fns.weightSetCount(m),
        "weightsPage": fns.weightsPage(m, 0, 4),
        "weightCommitment": fns.weightCommitment(m, validators[0].address),
        "latestCheckpoint": fns.latestCheckpoint(),
        "latestCheckpointBefore (running round)": fns.latestCheckpointBefore(m),
        "latestCheckpointBefore (binary search)": fns.latestCheckpointBefore(mid),
        "checkpointOf": fns.checkpointOf(mid),
        "currentTask": fns.currentTask(),
        "position": fns.position(node.w3.eth.block_number),
    }.items():
        call(name, fn)
    for name, gas in sorted(figures.items(), key=lambda kv: -kv[1]):
        print(f"{name:<42} {gas:>12,}")
    txs = ("commit", "register", "commitWeights", "setWeights", "publishCheckpoint")
    reads = {n: g for n, g in figures.items() if n not in txs}
    assert max(reads.values()) < VIEW_GAS, reads
    assert max(figures.values()) < TX_GAS, figures
    # The roles' own calls, through EvmChain under the VIEW_GAS cap, on the full history.
    assert len(view.members()) == 6 + SYBILS
    assert len(view.commitments(m)) == SYBIL_COMMITS
    assert len(view.weights(m)) == 4 and all(
        len(w) == MAX_WEIGHTS for w in view.weights(m).values()
    )
    assert view.latest_checkpoint(before_round=m).round == r and view.checkpoint(mid).round == mid

    # -- the old unbounded pattern: the same data in one call would not fit in a block
    all_members = sum(pages)
    one_checkpoint = figures["checkpointOf"] - 21_000
    print(
        f"all members, page by page: {all_members:,}; 5,000 checkpoints: >= {one_checkpoint * 5000:,}"
    )
    assert all_members > BLOCK_GAS and one_checkpoint * PAST_CHECKPOINTS > BLOCK_GAS
    assert time.monotonic() - started < 120
