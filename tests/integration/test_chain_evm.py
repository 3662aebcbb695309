"""EvmChain and the MoesaicRegistry contract on real local EVMs (anvil and in-process py-evm).

A full round as the roles run it, every revert path decoded into its ChainError code, the
contract's schedule against protocol.round.schedule block by block, and `moesaic chain` deploy/status.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest

from protocol.chain import Chain, ChainError, Checkpoint, Commitment, Member, Task
from protocol.chain.evm import EvmChain, deploy_registry, load_account, send, weights_hash
from protocol.round.schedule import Schedule, commit_deadline, phase_bounds, position

BOND = 10**15  # wei: 0.001 ether
SALT = b"\x5a" * 32  # a weights commitment's salt
# Long enough phases for a few transactions each (one block per transaction under automine).
LENGTHS = (4, 6, 2, 2, 6, 4)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Registry:
    """A freshly deployed registry with a chain client per role (uids 0-2 miners, 3 validator)."""

    evm: object
    schedule: Schedule
    owner: EvmChain
    miners: list[EvmChain]
    validator: EvmChain
    outsider: EvmChain

    def goto(self, rnd: int, phase: str) -> None:
        """Mine so the next transaction lands in the first block of `phase` of `rnd`."""
        self.evm.mine_to(phase_bounds(self.schedule, rnd, phase)[0])


def deploy(evm, *, start_in: int = 12, bond: int = BOND) -> Registry:
    """Deploy, register three miners and authorise a validator; round 0 starts `start_in` on."""
    schedule = Schedule(evm.w3.eth.block_number + start_in, *LENGTHS)
    owner_key, *keys = evm.accounts
    address = deploy_registry(evm.w3, owner_key, schedule, bond)
    chains = [EvmChain(evm.w3, address, k, timeout=30) for k in keys]
    reg = Registry(
        evm,
        schedule,
        EvmChain(evm.w3, address, owner_key, timeout=30),
        chains[:3],
        chains[3],
        chains[4],
    )
    for m in reg.miners:
        m.register()
    reg.owner.authorise_validator(reg.validator.account.address)
    return reg


@pytest.fixture
def reg(evm) -> Registry:
    return deploy(evm)


def expect(code: str, call, *args):
    """Run `call(*args)` and assert it reverts with the custom error `code`."""
    with pytest.raises(ChainError) as info:
        call(*args)
    assert info.value.code == code, info.value
    return info.value


# ---------------------------------------------------------------------------- the whole round


def test_full_round(reg):
    owner, miners, val = reg.owner, reg.miners, reg.validator
    assert isinstance(owner, Chain)
    members = owner.members()
    assert [m.uid for m in members] == [0, 1, 2, 3]
    assert members[0] == Member(0, miners[0].account.address, 0.001, False)
    assert members[3] == Member(3, val.account.address, 0.0, True)

    hashes = [digest("base"), digest("assignment"), digest("data")]
    assert owner.publish_task(*hashes, "hf://moesaic/task-0") == 0
    assert val.task() == Task(0, *hashes, "hf://moesaic/task-0")

    reg.goto(0, "commit")
    blocks = [m.commit(0, digest(f"manifest-{i}")) for i, m in enumerate(miners)]
    first, last = phase_bounds(reg.schedule, 0, "commit")
    assert first == blocks[0] and all(first <= b <= last for b in blocks)
    assert val.commitments(0) == [
        Commitment(m.account.address, 0, digest(f"manifest-{i}"), b)
        for i, (m, b) in enumerate(zip(miners, blocks, strict=True))
    ]
    assert val.commitments(1) == []
    events = owner.contract.events.Committed().get_logs(from_block=first)
    assert [e["args"]["uid"] for e in events] == [0, 1, 2]

    reg.goto(0, "evaluate")
    val.commit_weights(0, [0, 1, 2], [1.0, 0.5, 0.0], SALT)
    reg.goto(0, "weights")
    seed = val.block_hash(commit_deadline(reg.schedule, 0))
    assert seed.startswith("0x") and len(seed) == 66
    val.set_weights(0, [0, 1, 2], [1.0, 0.5, 0.0], SALT)
    assert owner.weights(0) == {3: {0: 65535, 1: 32768}}

    reg.goto(0, "merge")
    block = owner.publish_checkpoint(0, digest("merged"), "file:///ckpt/0", digest("deltas"))
    want = Checkpoint(
        0, digest("merged"), "file:///ckpt/0", digest("deltas"), block, owner.account.address
    )
    assert val.checkpoint(0) == want == val.latest_checkpoint() == val.latest_checkpoint(1)
    assert val.checkpoint(1) is None and val.latest_checkpoint(before_round=0) is None
    assert owner.position(block) == tuple(vars(position(reg.schedule, block)).values())


def test_bond_refund_and_uid_reuse(reg):
    w3, miner = reg.evm.w3, reg.miners[1]
    before = w3.eth.get_balance(miner.account.address)
    miner.deregister()
    assert w3.eth.get_balance(miner.registry) == 2 * BOND  # the two bonds still held
    # The refund came back (minus gas): the balance grew by more than half the bond.
    assert w3.eth.get_balance(miner.account.address) > before + BOND // 2
    assert [m.uid for m in reg.owner.members()] == [0, 2, 3]
    assert reg.outsider.register(bond=2 * BOND) == 1  # the freed uid is reused
    assert reg.owner.members()[1] == Member(1, reg.outsider.account.address, 0.002, False)
    # A validator who also bonds keeps one uid; withdrawing the permit keeps the miner.
    assert reg.validator.register() == 3
    reg.owner.authorise_validator(reg.validator.account.address, allowed=False)
    assert reg.owner.members()[3] == Member(3, reg.validator.account.address, 0.001, False)


# ---------------------------------------------------------------------------- revert paths


def test_commit_reverts(reg):
    miner = reg.miners[0]
    err = expect("WrongPhase", miner.commit, 0, digest("early"))  # before round 0 starts
    assert "expected=commit" in err.message and "currentPhase=not-started" in err.message
    reg.goto(0, "train")
    expect("WrongPhase", miner.commit, 0, digest("train"))
    reg.goto(0, "commit")
    expect("WrongPhase", miner.commit, 1, digest("next round"))
    expect("NotRegistered", reg.outsider.commit, 0, digest("outsider"))
    expect("NotRegistered", reg.validator.commit, 0, digest("validator without bond"))
    miner.commit(0, digest("one"))
    expect("AlreadyCommitted", miner.commit, 0, digest("two"))
    reg.goto(0, "reveal")
    expect("WrongPhase", reg.miners[1].commit, 0, digest("late"))
    with pytest.raises(ValueError):
        miner.commit(1, "AB" * 32)  # digests are lowercase hex, checked before sending


def test_revert_after_sending_is_decoded(reg, monkeypatch):
    # A node whose gas estimate passes a call that then reverts on chain (another transaction
    # in the same block, a different block.number): the receipt fails and a replay names it.
    import protocol.chain.evm as evm_module

    monkeypatch.setattr(evm_module, "_estimate", lambda fn, tx: 200_000)
    block = reg.evm.w3.eth.block_number
    expect("WrongPhase", reg.miners[0].commit, 0, digest("too early"))
    assert reg.evm.w3.eth.block_number == block + 1  # it was mined, and failed


def test_weights_reverts(reg):
    val, w3 = reg.validator, reg.evm.w3
    fns = val.contract.functions
    reg.goto(0, "commit")
    expect("WrongPhase", val.commit_weights, 0, [0], [1.0], SALT)
    expect("WrongPhase", val.set_weights, 0, [0], [1.0], SALT)
    reg.goto(0, "evaluate")
    expect("NotValidator", reg.miners[0].commit_weights, 0, [0], [1.0], SALT)
    expect("EmptyWeightCommitment", send, w3, val.account, fns.commitWeights(0, bytes(32)))

    def raw(uids, weights, salt=SALT):  # bypass the Python-side checks to reach the contract's
        return send(w3, val.account, fns.setWeights(0, uids, weights, salt))

    # One commitment covers one vector: commit a hostile one to reach the later checks.
    hostile = ([0, 9], [1, 1])
    send(w3, val.account, fns.commitWeights(0, weights_hash(0, val.address, *hostile, SALT)))
    expect("AlreadyCommittedWeights", val.commit_weights, 0, [0], [1.0], SALT)
    reg.goto(0, "weights")
    expect("NotValidator", reg.miners[0].set_weights, 0, [0], [1.0], SALT)
    expect("BadLengths", raw, [0, 1], [1])
    expect("TooManyWeights", raw, list(range(513)), [1] * 513)
    expect("WeightsMismatch", raw, [1, 2, 1], [1, 1, 1])
    expect("InvalidUid", raw, *hostile)
    assert reg.owner.weights(0) == {}
    reg.goto(0, "merge")
    expect("WrongPhase", val.set_weights, 0, [0], [1.0], SALT)
    # The next round: a duplicate uid, and a second reveal after a good one.
    reg.goto(1, "evaluate")
    send(
        w3,
        val.account,
        fns.commitWeights(1, weights_hash(1, val.address, [1, 2, 1], [1] * 3, SALT)),
    )
    reg.goto(1, "weights")
    expect("DuplicateUid", send, w3, val.account, fns.setWeights(1, [1, 2, 1], [1] * 3, SALT))
    reg.goto(2, "evaluate")
    val.commit_weights(2, [0], [1.0], SALT)
    reg.goto(2, "weights")
    val.set_weights(2, [0], [1.0], SALT)
    expect("AlreadySetWeights", val.set_weights, 2, [0], [1.0], SALT)


def test_weights_hash_is_the_contracts(reg):
    """The commitment EvmChain sends is the contract's own weightsHash (keccak256 of
    abi.encode(round, validator, uids, values, salt)), and the salt must be 32 bytes."""
    val = reg.validator
    args = (3, val.address, [0, 2, 7], [65535, 1, 300], SALT)
    assert val.contract.functions.weightsHash(*args).call() == weights_hash(*args)
    other = weights_hash(3, reg.outsider.address, *args[2:])
    assert other != weights_hash(*args)  # the sender is in the hash: no one commits another's
    with pytest.raises(ValueError, match="32 bytes"):
        val.commit_weights(0, [0], [1.0], b"short")


def test_checkpoint_reverts(reg):
    owner, outsider = reg.owner, reg.outsider
    args = (digest("merged"), "file:///ckpt", digest("deltas"))
    reg.goto(0, "weights")
    expect("WrongPhase", owner.publish_checkpoint, 0, *args)
    reg.goto(0, "merge")
    expect("NotMerger", outsider.publish_checkpoint, 0, *args)
    expect("UriTooLong", owner.publish_checkpoint, 0, args[0], "x" * 1025, args[2])
    owner.set_merger(outsider.account.address)
    outsider.publish_checkpoint(0, *args)  # an authorised merger may publish
    expect("AlreadyPublished", owner.publish_checkpoint, 0, *args)
    expect("WrongPhase", owner.publish_checkpoint, 1, *args)
    assert owner.checkpoint(0).publisher == outsider.account.address
    reg.goto(1, "train")
    expect("WrongPhase", owner.publish_checkpoint, 0, *args)  # past its merge phase: too late


def test_paged_reads_and_latest_checkpoint_before(reg):
    """Pages split and join exactly (a page never holds more than asked, free slots are
    skipped), and latestCheckpointBefore answers for rounds with and without a checkpoint."""
    fns, owner = reg.owner.contract.functions, reg.owner
    reg.miners[1].deregister()  # uid 1 is a free slot now
    assert fns.memberCount().call() == 4
    assert [m[0] for m in fns.membersPage(0, 2).call()] == [0]
    assert [m[0] for m in fns.membersPage(2, 2).call()] == [2, 3]
    assert fns.membersPage(4, 2).call() == [] and fns.membersPage(9, 256).call() == []
    expect("PageTooLarge", owner._call, fns.membersPage(0, 257))
    expect("PageTooLarge", owner._call, fns.commitmentsPage(0, 0, 257))
    expect("PageTooLarge", owner._call, fns.weightsPage(0, 0, 5))
    assert [m.uid for m in owner.members()] == [0, 2, 3]
    reg.goto(0, "commit")
    reg.miners[0].commit(0, digest("a"))
    reg.miners[2].commit(0, digest("b"))
    assert [c[0] for c in fns.commitmentsPage(0, 1, 5).call()] == [reg.miners[2].address]
    assert [c.digest for c in owner.commitments(0)] == [digest("a"), digest("b")]
    published = {}
    for rnd in (0, 2, 3, 6):
        reg.goto(rnd, "merge")
        owner.publish_checkpoint(rnd, digest(f"m{rnd}"), f"file:///{rnd}", digest("d"))
        published[rnd] = owner.checkpoint(rnd)
    assert fns.checkpointCount().call() == 4
    before = {r: owner.latest_checkpoint(before_round=r) for r in range(9)}
    want = {0: None, 1: 0, 2: 0, 3: 2, 4: 3, 5: 3, 6: 3, 7: 6, 8: 6}
    assert {r: c.round if c else None for r, c in before.items()} == want
    assert all(c is None or c == published[c.round] for c in before.values())
    assert owner.latest_checkpoint() == published[6]
    assert [owner.checkpoint(r) is not None for r in range(7)] == [
        True, False, True, True, False, False, True
    ]  # fmt: skip


@pytest.mark.parametrize(
    "action",
    ["authorise_validator", "set_merger", "set_min_bond", "publish_task", "transfer_ownership"],
)
def test_admin_calls_need_owner(reg, action):
    miner, other = reg.miners[0], reg.outsider.account.address
    calls = {
        "authorise_validator": lambda: miner.authorise_validator(other),
        "set_merger": lambda: miner.set_merger(other),
        "set_min_bond": lambda: miner.set_min_bond(0),
        "publish_task": lambda: miner.publish_task(digest("b"), digest("a"), digest("d"), "u"),
        "transfer_ownership": lambda: miner.transfer_ownership(other),
    }
    expect("NotOwner", calls[action])


def test_registration_reverts(reg):
    outsider, owner = reg.outsider, reg.owner
    expect("InsufficientBond", outsider.register, BOND - 1)
    expect("AlreadyRegistered", reg.miners[0].register)
    expect("NotRegistered", outsider.deregister)
    expect("NotValidator", owner.authorise_validator, outsider.account.address, False)
    expect("NoTask", owner.task)
    owner.set_min_bond(0)
    assert outsider.register() == 4  # no bond needed any more
    owner.transfer_ownership(outsider.account.address)
    expect("NotOwner", owner.set_min_bond, 1)
    assert outsider.owner() == outsider.account.address


# ---------------------------------------------------------------------------- RPC failures


@pytest.mark.parametrize("kind", ["garbage", "bad_result", "rpc_error"])
@pytest.mark.parametrize("method", ["eth_call", "eth_blockNumber", "eth_estimateGas"])
def test_rpc_failures_of_any_kind_are_chain_errors(anvil_node, anvil_url, kind, method):
    """An endpoint answering garbage, a result of the wrong shape or an error object: every
    call the roles make raises ChainError with a code the run loop survives, never a web3,
    JSON or decoding exception (which used to end the daemon)."""
    from protocol.chain.evm import connect
    from protocol.round.runtime import after_failure
    from tests.integration.rpc_proxy import RpcProxy

    reg = deploy(anvil_node)
    with RpcProxy(anvil_url) as proxy:
        client = EvmChain(connect(proxy.url, timeout=5), reg.owner.registry, reg.miners[0].account)
        client.retries, client.backoff = 1, 0.01
        calls = {
            "eth_call": lambda: client.members(),
            "eth_blockNumber": lambda: client.block(),
            "eth_estimateGas": lambda: client.deregister(),
        }
        proxy.fault(method, kind, times=10)
        with pytest.raises(ChainError) as e:
            calls[method]()
        assert e.value.code in ("BadResponse", "RpcError", "Rejected", "Unreachable"), e.value
        assert after_failure(e.value) in ("retry", "skip")
        proxy.clear()
        assert [m.uid for m in client.members()] == [0, 1, 2, 3]  # the endpoint healed


def test_a_read_that_runs_out_of_gas_is_a_chain_error(reg):
    """A view past the gas cap of eth_call (a node's, or the client's call_gas) is
    ChainError("OutOfGas"), which the run loop survives, not an exception that ends it."""
    from protocol.round.runtime import after_failure

    starved = EvmChain(reg.evm.w3, reg.owner.registry, call_gas=25_000)
    with pytest.raises(ChainError) as e:
        starved.members()
    assert e.value.code == "OutOfGas", e.value
    assert after_failure(e.value) == "skip"
    assert len(EvmChain(reg.evm.w3, reg.owner.registry).members()) == 4


# ---------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("start, lengths", [(7, (3, 2, 4, 1, 5, 2)), (0, (1, 1, 1, 1, 1, 1))])
def test_position_matches_python(evm, start, lengths):
    schedule = Schedule(start, *lengths)
    address = deploy_registry(evm.w3, evm.accounts[0], schedule, 0)
    chain = EvmChain(evm.w3, address)
    assert chain.schedule() == schedule
    fn = chain.contract.functions
    # position(block) is a view over its argument: no mining needed to cover many rounds.
    for block in range(300):
        want = position(schedule, block)
        started, rnd, phase, first, last = fn.position(block).call()
        if want is None:
            assert not started, block
            continue
        got = (rnd, ("train", "commit", "reveal", "evaluate", "weights", "merge")[phase])
        assert got + (first, last) == (want.round, want.phase, want.phase_start, want.phase_end)
        if block % 37 == 0:
            assert fn.phaseBounds(rnd, phase).call() == [first, last]


# ---------------------------------------------------------------------------- keys


def test_load_account(tmp_path):
    from eth_account import Account

    key = "0x" + hashlib.sha256(b"key").hexdigest()
    path = tmp_path / "key.json"
    path.write_text(json.dumps(Account.encrypt(key, "pw", iterations=2)))
    assert load_account(keystore=path, password="pw").address == Account.from_key(key).address
    with pytest.raises(ValueError, match="decrypt"):
        load_account(keystore=path, password="wrong")
    with pytest.raises(ValueError, match="exactly one"):
        load_account()
    with pytest.raises(ValueError, match="hex private key"):
        load_account(key="0x1234")


def test_open_chain_builds_the_configured_client(anvil_node, anvil_url, tmp_path):
    from protocol.chain import open_chain
    from protocol.config import ChainConfig
    from protocol.identity.keys import EthSigner, load_signer
    from protocol.round.manifest import evm_chain

    reg = deploy(anvil_node)
    config = ChainConfig(rpc=anvil_url, registry=reg.owner.registry)
    signer = EthSigner(anvil_node.accounts[1].key)
    chain = open_chain(config, signer)
    assert isinstance(chain, Chain) and chain.identity() == signer.identity
    chain_id = anvil_node.w3.eth.chain_id
    assert chain.label() == evm_chain(chain_id, reg.owner.registry)
    assert chain.schedule() == reg.schedule
    assert open_chain(config).identity() is None  # no signer: read-only
    with pytest.raises(ValueError, match=f"chain_id is {chain_id + 1} but the node"):
        open_chain(ChainConfig(rpc=anvil_url, registry=reg.owner.registry, chain_id=chain_id + 1))
    with pytest.raises(ValueError, match="sends with an Ethereum key"):
        open_chain(config, load_signer("sr25519://Alice"))


# ---------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_main():
    """The console script's entry point."""
    from moesaic import cli

    return cli.main


def test_cli_deploy_and_status(cli_main, anvil_node, anvil_url, tmp_path, capsys):
    from eth_account import Account

    owner = anvil_node.accounts[0]
    keystore = tmp_path / "owner.json"
    keystore.write_text(json.dumps(Account.encrypt(owner.key, "secret pw", iterations=2)))
    (tmp_path / "pw").write_text("secret pw\n")
    (tmp_path / "pw").chmod(0o600)  # a password file other users may read is refused
    start = anvil_node.w3.eth.block_number + 3
    argv = ["chain", "deploy", "--rpc", anvil_url, "--keystore", str(keystore)]
    argv += ["--password-file", str(tmp_path / "pw"), "--schedule", f"{start},4,6,2,2,6,4"]
    assert cli_main([*argv, "--bond", str(BOND)]) == 0
    out = capsys.readouterr().out
    address = out.split()[1]
    assert f"min_bond  {BOND} wei" in out and "train=4 commit=6" in out

    miner = EvmChain(anvil_node.w3, address, anvil_node.accounts[1])
    miner.register()
    anvil_node.mine_to(phase_bounds(Schedule(start, *LENGTHS), 0, "commit")[0])
    miner.commit(0, digest("m"))
    assert cli_main(["chain", "status", "--rpc", anvil_url, "--registry", address]) == 0
    out = capsys.readouterr().out
    assert "phase commit" in out and "commits   1 in round 0" in out
    assert miner.account.address in out and "checkpoint none" in out

    assert cli_main(["chain", "deploy", "--rpc", anvil_url, "--key", "0x12"]) == 2
    bad = ["chain", "deploy", "--rpc", anvil_url, "--key", owner.key.to_0x_hex()]
    assert cli_main([*bad, "--schedule", "1,2,3"]) == 2
    assert cli_main(["chain", "status", "--rpc", anvil_url, "--registry", owner.address]) == 2
    assert "no contract" in capsys.readouterr().err
