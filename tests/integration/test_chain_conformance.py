"""One chain scenario, the same assertions, on every backend that supports it.

Backends: `fake` (in-memory, what unit tests use), `anvil` (our registry contract on a real
JSON-RPC EVM node), `pyevm` (the contract on in-process py-evm) and `subtensor-evm` (the
registry plus weights through the neuron precompile, a compiled stand-in placed at its address
on anvil). The subtensor backend runs
its own scenario against the real runtime in test_chain_subtensor.py: the 2023 runtime that
chopsticks can host has no Commitments pallet, so the commit steps cannot run there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest

from protocol.chain import U16_MAX, Chain, ChainError
from protocol.round.schedule import Schedule, phase_bounds

LENGTHS = dict(train=3, commit=4, reveal=2, evaluate=2, weights=4, merge=3)


def digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


@dataclass
class Harness:
    owner: Any
    miners: list
    validator: Any
    outsider: Any
    schedule: Schedule
    mine_to: Any  # next transaction lands in this block
    register: Any = lambda client: client.register()  # noqa: E731


def _fake() -> Harness:
    from protocol.chain.fake import FakeChain, FakeLedger

    ledger = FakeLedger(Schedule(start_block=5, **LENGTHS))

    def mine_to(block):
        ledger.mine_to(block - 1)

    c = [FakeChain(ledger, name) for name in ("owner", "m0", "m1", "val", "x")]
    return Harness(c[0], c[1:3], c[3], c[4], ledger.schedule, mine_to)


def _evm(node) -> Harness:
    from protocol.chain.evm import EvmChain, deploy_registry

    schedule = Schedule(start_block=node.w3.eth.block_number + 12, **LENGTHS)
    address = deploy_registry(node.w3, node.accounts[0], schedule, bond=10**15)
    c = [EvmChain(node.w3, address, acct) for acct in node.accounts[:5]]
    return Harness(c[0], c[1:3], c[3], c[4], schedule, node.mine_to)


def _subtensor_evm(node) -> Harness:
    from protocol.chain.evm import artifact
    from protocol.chain.subtensor_evm import NEURON_PRECOMPILE, SubtensorEvmChain

    code = artifact("NeuronPrecompileStandIn")["deployedBytecode"]
    node.w3.provider.make_request("anvil_setCode", [NEURON_PRECOMPILE, code])
    h = _evm(node)
    wrap = [SubtensorEvmChain(c, netuid=1) for c in (*h.miners, h.validator, h.outsider)]
    return Harness(
        h.owner,
        wrap[:2],
        wrap[2],
        wrap[3],
        h.schedule,
        h.mine_to,
        register=lambda client: client.registry.register(),
    )


@pytest.fixture(params=["fake", "anvil", "pyevm", "subtensor-evm"])
def h(request) -> Harness:
    if request.param == "fake":
        return _fake()
    if request.param == "subtensor-evm":
        return _subtensor_evm(request.getfixturevalue("anvil_node"))
    return _evm(request.getfixturevalue(f"{request.param}_node"))


def test_clients_satisfy_the_interface(h):
    assert isinstance(h.owner, Chain) and isinstance(h.miners[0], Chain)


def test_identity_label_and_schedule(h):
    """What a role reads before its first round: whom it sends as, the deployment its
    manifests name, and the round schedule."""
    from protocol.round.manifest import Manifest

    assert h.miners[0].identity() != h.miners[1].identity()
    assert h.miners[0].identity() == h.miners[0].address
    label = h.miners[0].label()
    assert label == h.outsider.label()  # one deployment, whoever reads it
    zero = "0" * 64
    Manifest(label, 0, 0, zero, zero, zero, 1, "x", "0x" + "0" * 40, 0, "float32")  # valid
    assert h.miners[0].schedule() == h.schedule


def test_round_scenario(h):
    """register -> task -> commit -> read -> weights -> read -> checkpoint -> read."""
    uids = [h.register(m) for m in h.miners]
    assert len(set(uids)) == 2
    h.owner.authorise_validator(h.validator.address)
    task_id = h.owner.publish_task(
        digest("base"), digest("assignment"), digest("data"), "file:///task"
    )
    t = h.miners[0].task()
    assert (t.task_id, t.base_hash, t.uri) == (task_id, digest("base"), "file:///task")

    start, end = phase_bounds(h.schedule, 0, "commit")
    h.mine_to(start)
    b0 = h.miners[0].commit(0, digest("a0"))
    b1 = h.miners[1].commit(0, digest("a1"))
    assert start <= b0 < b1 <= end
    got = sorted(h.validator.commitments(0), key=lambda c: c.block)
    assert [(c.round, c.digest, c.block) for c in got] == [
        (0, digest("a0"), b0),
        (0, digest("a1"), b1),
    ]
    assert h.validator.commitments(1) == []
    seed = h.validator.block_hash(b0)
    assert seed.startswith("0x") and len(seed) == 66 and seed != h.validator.block_hash(b1)

    with pytest.raises(ChainError) as e:
        h.miners[0].commit(0, digest("again"))
    assert e.value.code == "AlreadyCommitted"

    w_start, _ = phase_bounds(h.schedule, 0, "weights")
    h.mine_to(w_start)
    h.validator.set_weights(0, uids, [0.25, 0.5])
    (stored,) = h.owner.weights(0).values()
    assert stored == {uids[0]: round(U16_MAX / 2), uids[1]: U16_MAX}
    with pytest.raises(ChainError) as e:
        h.miners[0].set_weights(0, uids, [1.0, 1.0])
    assert e.value.code == "NotValidator"

    m_start, _ = phase_bounds(h.schedule, 0, "merge")
    h.mine_to(m_start)
    h.owner.publish_checkpoint(0, digest("ckpt"), "http://127.0.0.1/ckpt", digest("deltas"))
    (ck,) = h.outsider.checkpoints()
    assert (ck.round, ck.digest, ck.uri, ck.deltas_digest) == (
        0,
        digest("ckpt"),
        "http://127.0.0.1/ckpt",
        digest("deltas"),
    )
    with pytest.raises(ChainError) as e:
        h.owner.publish_checkpoint(0, digest("ckpt2"), "x", digest("d"))
    assert e.value.code == "AlreadyPublished"


def test_phase_and_registration_rules(h):
    h.register(h.miners[0])
    with pytest.raises(ChainError) as e:
        h.outsider.commit(0, digest("x"))
    assert e.value.code == "NotRegistered"
    # Before the commit phase of round 0 (the train phase or before the first round).
    with pytest.raises(ChainError) as e:
        h.miners[0].commit(0, digest("early"))
    assert e.value.code == "WrongPhase"
    from protocol.chain.subtensor_evm import SubtensorEvmChain

    # subtensor-evm clients make admin calls through their registry client
    outsider = h.outsider.registry if isinstance(h.outsider, SubtensorEvmChain) else h.outsider
    with pytest.raises(ChainError) as e:
        outsider.publish_task(digest("b"), digest("a"), digest("d"), "u")
    assert e.value.code == "NotOwner"
    with pytest.raises(ChainError) as e:
        h.outsider.task()
    assert e.value.code == "NoTask"
