"""One chain scenario, the same assertions, on every backend that supports it.

Backends: `fake` (in-memory, what unit tests use), `anvil` (our registry contract on a real
JSON-RPC EVM node), `pyevm` (the contract on in-process py-evm) and `subtensor-evm` (the
registry plus weights through the neuron precompile, a compiled stand-in placed at its address
on anvil). The subtensor backend runs its own scenario against the spec-293 runtime in
chopsticks (test_chain_subtensor.py): these cases assert rules our registry enforces (phases,
one commitment per round, authorised validators, round-keyed weights and checkpoints) that a
subtensor subnet does not, so they cannot run there unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest

from protocol.chain import U16_MAX, Chain, ChainError
from protocol.round.schedule import Schedule, phase_bounds

LENGTHS = dict(train=3, commit=4, reveal=2, evaluate=3, weights=5, merge=3)
SALT = b"s" * 32  # the weights commitment's salt (32 bytes, as the registry takes it)


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

    e_start, _ = phase_bounds(h.schedule, 0, "evaluate")
    h.mine_to(e_start)
    assert h.validator.weight_commitment(0, h.validator.address) is None
    h.validator.commit_weights(0, uids, [0.25, 0.5], SALT)
    assert h.owner.weight_commitment(0, h.validator.address) is not None
    w_start, _ = phase_bounds(h.schedule, 0, "weights")
    h.mine_to(w_start)
    h.validator.set_weights(0, uids, [0.25, 0.5], SALT)
    (stored,) = h.owner.weights(0).values()
    assert stored == {uids[0]: round(U16_MAX / 2), uids[1]: U16_MAX}
    with pytest.raises(ChainError) as e:
        h.miners[0].set_weights(0, uids, [1.0, 1.0], SALT)
    assert e.value.code == "NotValidator"

    assert h.outsider.latest_checkpoint() is None and h.outsider.checkpoint(0) is None
    m_start, _ = phase_bounds(h.schedule, 0, "merge")
    h.mine_to(m_start)
    h.owner.publish_checkpoint(0, digest("ckpt"), "http://127.0.0.1/ckpt", digest("deltas"))
    ck = h.outsider.checkpoint(0)
    assert (ck.round, ck.digest, ck.uri, ck.deltas_digest) == (
        0,
        digest("ckpt"),
        "http://127.0.0.1/ckpt",
        digest("deltas"),
    )
    assert h.outsider.latest_checkpoint() == ck == h.outsider.latest_checkpoint(before_round=1)
    assert h.outsider.latest_checkpoint(before_round=0) is None
    with pytest.raises(ChainError) as e:
        h.owner.publish_checkpoint(0, digest("ckpt2"), "x", digest("d"))
    assert e.value.code == "AlreadyPublished"


def _validators(h: Harness) -> tuple:
    """Two validators: the harness's and the miner turned validator (uids exist to weigh)."""
    uids = [h.register(m) for m in h.miners]
    h.owner.authorise_validator(h.validator.address)
    h.owner.authorise_validator(h.miners[1].address)
    return h.validator, h.miners[1], uids


def test_a_reveal_must_match_its_own_commitment(h):
    """Weights are committed in the evaluate phase and revealed in the weights phase: a reveal
    with other weights or another salt, or with no commitment at all, is refused."""
    honest, other, uids = _validators(h)
    h.mine_to(phase_bounds(h.schedule, 0, "evaluate")[0])
    with pytest.raises(ChainError) as e:
        honest.set_weights(0, uids, [1.0, 0.5], SALT)  # reveals wait for the weights phase
    assert e.value.code == "WrongPhase"
    honest.commit_weights(0, uids, [1.0, 0.5], SALT)
    with pytest.raises(ChainError) as e:
        honest.commit_weights(0, uids, [0.5, 1.0], SALT)
    assert e.value.code == "AlreadyCommittedWeights"
    h.mine_to(phase_bounds(h.schedule, 0, "weights")[0])
    with pytest.raises(ChainError) as e:
        other.commit_weights(0, uids, [1.0, 0.5], SALT)  # commitments close with evaluate
    assert e.value.code == "WrongPhase"
    for weights, salt in (([0.5, 1.0], SALT), ([1.0, 0.5], bytes(32))):
        with pytest.raises(ChainError) as e:
            honest.set_weights(0, uids, weights, salt)
        assert e.value.code == "WeightsMismatch"
    with pytest.raises(ChainError) as e:
        other.set_weights(0, uids, [1.0, 0.5], SALT)
    assert e.value.code == "NoWeightCommitment"
    honest.set_weights(0, uids, [1.0, 0.5], SALT)
    assert list(h.owner.weights(0).values()) == [{uids[0]: U16_MAX, uids[1]: round(U16_MAX / 2)}]


def test_a_validator_cannot_copy_another_validators_weights(h):
    """The attack: a validator that evaluates nothing waits for an honest one's weights and
    sets the same. While commitments are open only hashes are on chain; the copier's own hash
    (committed blind, or the honest one's hash copied) cannot be opened with the honest
    weights once they are revealed, and no commitment is accepted after the evaluate phase."""
    honest, copier, uids = _validators(h)
    h.mine_to(phase_bounds(h.schedule, 0, "evaluate")[0])
    honest.commit_weights(0, uids, [1.0, 0.25], SALT)
    # All the copier can see now is a hash: no weights of round 0 are readable yet.
    assert h.owner.weights(0) == {}
    seen = h.owner.weight_commitment(0, honest.address)
    assert seen is not None and len(seen) == 64
    copier.commit_weights(0, uids, [1.0, 1.0], b"c" * 32)  # a blind guess
    h.mine_to(phase_bounds(h.schedule, 0, "weights")[0])
    honest.set_weights(0, uids, [1.0, 0.25], SALT)  # now the weights and salt are public
    (revealed,) = h.owner.weights(0).values()
    copied = [revealed[u] / U16_MAX for u in uids]
    for salt in (SALT, b"c" * 32):
        with pytest.raises(ChainError) as e:
            copier.set_weights(0, uids, copied, salt)
        assert e.value.code == "WeightsMismatch"
    assert len(h.owner.weights(0)) == 1  # only the honest validator's weights count


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


def test_a_late_checkpoint_cannot_change_a_running_rounds_base(h, tmp_path):
    """The attack (or a slow merger): round 0's checkpoint published after round 1 started.
    Miners of round 1 trained on the base they saw at its start (the task base); had the
    checkpoint landed, validators collecting round 1 would check against it and reject every
    honest miner as `wrong_base`. The registry takes a round's checkpoint only in that round's
    merge phase, so round 1's base is the same at its start and when it is collected."""
    from protocol.round.lineage import Lineage

    lineage = Lineage(h.outsider, task_base=tmp_path, cache_dir=tmp_path, task_base_hash="0" * 64)
    h.mine_to(phase_bounds(h.schedule, 1, "train")[0])  # round 1 has started
    at_start = lineage.checkpoint_for(1)
    assert at_start is None  # round 1 builds on the task base
    with pytest.raises(ChainError) as e:
        h.owner.publish_checkpoint(0, digest("late"), "http://127.0.0.1/late", digest("d"))
    assert e.value.code == "WrongPhase"
    h.mine_to(phase_bounds(h.schedule, 1, "reveal")[0])  # validators collect round 1 now
    assert lineage.checkpoint_for(1) == at_start and h.outsider.checkpoint(0) is None
    # Round 1's own checkpoint, in its merge phase, is round 2's base and changes nothing for 1.
    h.mine_to(phase_bounds(h.schedule, 1, "merge")[0])
    h.owner.publish_checkpoint(1, digest("on time"), "http://127.0.0.1/1", digest("d"))
    assert lineage.checkpoint_for(1) is None and lineage.checkpoint_for(2).round == 1
