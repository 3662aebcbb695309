"""SubtensorChain against a real subtensor runtime: chopsticks running spec 293 (July 2025).

One node per module (see chopsticks.py). Alice (sudo) registers a subnet with
`register_network` (she is its owner and uid 0), sets its hyperparameters through AdminUtils
(tempo 10, weights rate limit 0, many registrations per interval), waits out the start-call
delay and starts it; a validator (stake added by Alice) and two miners join with
`burned_register`. Covered here: members() (uids, hotkeys, stake, validator permit before and
after the first epoch), set_weights and weights(), module errors decoded into ChainError codes
(NeuronNoValidatorPermit, SettingWeightsTooFast, IncorrectWeightVersionKey,
HotKeyAlreadyRegisteredInSubNet), block hashes (block 0 through System.BlockHash), the
Commitments round trip, checkpoint and task records, commit-reveal v2 turned on by sudo
(commit, RevealTooEarly, reveal by a restarted client from the kept salt, a wrong salt refused,
the weights read back), and retry paths: an unreachable endpoint, and an answer lost after or
before the extrinsic reached the node (found, not re-sent; or re-sent exactly once).
tests/unit/test_subtensor_encoding.py checks the byte-exact encodings without any node.

Not covered: timelocked commit-reveal (crv3; offline there are no drand pulses), and runtimes
newer than 293 (mainnet's `*_mechanism_*` and `commit_timelocked_weights` calls).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from chopsticks import Chopsticks, free_port, running_chopsticks, sudo

from protocol.chain import Chain, ChainError, Member, Task
from protocol.chain.subtensor import SubtensorChain, commit_hash, keypair_from, salt_words
from protocol.round.schedule import Schedule

TEMPO = 10
STAKE = 10**12  # rao: 1000 TAO staked to the validator (it holds alpha bought with it)
START_CALL_DELAY = 10  # blocks after register_network before start_call (DurationOfStartCall)
SALT = bytes(range(32))  # the weights commitment's salt, as a validator keeps it


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Subnet:
    """A subnet on chopsticks owned by Alice (sudo), with a staked validator and two miners."""

    node: Chopsticks
    netuid: int
    admin: SubtensorChain
    validator: SubtensorChain
    miners: list[SubtensorChain]

    def sudo(self, function: str, **params) -> int:
        return sudo(self.admin, function, {"netuid": self.netuid, **params})

    def blocks_to_epoch(self) -> int:
        """Blocks to build until the one running the next epoch (the runtime's tempo rule)."""
        head = self.admin.block()
        return next(b - head for b in range(head + 1, head + TEMPO + 2) if self.epoch_block(b))

    def epoch_block(self, block: int) -> bool:
        return (block + self.netuid + 1) % (TEMPO + 1) == TEMPO

    def register(self, uri: str, stake: int = 0) -> SubtensorChain:
        return _register(self.node, self.admin, uri, stake)

    def uid(self, chain: SubtensorChain) -> int:
        return self.admin.uid_of(chain.keypair.ss58_address)


def _register(node: Chopsticks, admin: SubtensorChain, uri: str, stake: int) -> SubtensorChain:
    """burned_register a hotkey (coldkey and payer: the admin), stake to it, act as it."""
    key = keypair_from(uri=uri)
    params = {"netuid": admin.netuid, "hotkey": key.ss58_address}
    admin.submit("SubtensorModule", "burned_register", params)
    if stake:
        params = {"hotkey": key.ss58_address, "netuid": admin.netuid, "amount_staked": stake}
        admin.submit("SubtensorModule", "add_stake", params)
    return SubtensorChain(node.ws_url, admin.netuid, key, timeout=30)


@pytest.fixture(scope="module")
def subnet(tmp_path_factory) -> Iterator[Subnet]:
    with running_chopsticks(tmp_path_factory.mktemp("chopsticks")) as node:
        yield _open_subnet(node)


def _open_subnet(node: Chopsticks) -> Subnet:
    alice = keypair_from(uri="//Alice")  # sudo and funded in the spec's genesis
    root = SubtensorChain(node.ws_url, 0, alice, timeout=30)
    sudo(root, "sudo_set_network_rate_limit", {"rate_limit": 0})  # else NetworkTxRateLimitExceeded
    landed = root.submit("SubtensorModule", "register_network", {"hotkey": alice.ss58_address})
    (netuid,) = [a[0] for p, e, a in landed.events if (p, e) == ("SubtensorModule", "NetworkAdded")]
    admin = SubtensorChain(node.ws_url, netuid, alice, timeout=30)
    sudo(admin, "sudo_set_tempo", {"netuid": netuid, "tempo": TEMPO})
    sudo(admin, "sudo_set_weights_set_rate_limit", {"netuid": netuid, "weights_set_rate_limit": 0})
    many = {"netuid": netuid, "target_registrations_per_interval": 100}
    sudo(admin, "sudo_set_target_registrations_per_interval", many)
    node.new_blocks(START_CALL_DELAY)
    admin.submit("SubtensorModule", "start_call", {"netuid": netuid})  # staking opens
    validator = _register(node, admin, "//moesaic-validator", STAKE)
    miners = [_register(node, admin, f"//moesaic-miner-{i}", 0) for i in range(2)]
    return Subnet(node, netuid, admin, validator, miners)


def test_is_a_chain_and_reads_blocks(subnet):
    chain = subnet.miners[0]
    assert isinstance(chain, Chain)
    head = chain.block()
    subnet.node.new_blocks(2)
    assert chain.block() == head + 2
    assert chain.block_hash(head) == subnet.node.rpc("chain_getBlockHash", [head])
    genesis = subnet.node.rpc("state_getStorage", [_system_block_hash_0_key()])
    assert chain.block_hash(0) == genesis  # System.BlockHash(0): what signatures commit to
    with pytest.raises(ChainError) as err:
        chain.block_hash(head + 1000)
    assert err.value.code == "UnknownBlock"


def _system_block_hash_0_key() -> str:
    """Storage key of System.BlockHash(0): twox128 prefixes + twox64concat(u32 0)."""
    from substrateinterface.utils.hasher import two_x64_concat, xxh128

    parts = (xxh128(b"System"), xxh128(b"BlockHash"), two_x64_concat(bytes(4)))
    return "0x" + b"".join(bytes(p) for p in parts).hex()


def test_members_and_validator_permit_after_first_epoch(subnet):
    members = subnet.validator.members()
    hotkeys = [c.keypair.ss58_address for c in (subnet.admin, subnet.validator, *subnet.miners)]
    assert [(m.uid, m.hotkey) for m in members] == list(enumerate(hotkeys))
    assert all(isinstance(m, Member) for m in members)
    # Staked TAO buys the subnet's alpha through its pool: less than 1000, but far above 0.
    assert 1.0 < members[1].stake < STAKE / 1e9
    assert [m.stake for m in members[2:]] == [0.0, 0.0]
    subnet.node.new_blocks(subnet.blocks_to_epoch())
    members = subnet.validator.members()
    assert members[1].validator_permit
    assert subnet.validator.uid_of(hotkeys[3]) == 3
    assert subnet.validator.uid_of(keypair_from(uri="//nobody").ss58_address) is None


def test_no_validator_permit_until_an_epoch_runs(subnet):
    if subnet.blocks_to_epoch() <= 4:  # registration, stake and attempt land before the epoch
        subnet.node.new_blocks(subnet.blocks_to_epoch())
    late = subnet.register("//moesaic-late", stake=STAKE)
    with pytest.raises(ChainError) as err:
        late.set_weights(0, [2, 3], [1.0, 1.0])
    assert err.value.code == "NeuronNoValidatorPermit"


def test_set_weights_and_read_back(subnet):
    subnet.node.new_blocks(subnet.blocks_to_epoch())
    miner_uids = [subnet.uid(m) for m in subnet.miners]
    assert not subnet.validator.commit_reveal_enabled()
    block = subnet.validator.set_weights(0, miner_uids, [1.0, 0.5])
    assert block == subnet.validator.block()
    got = subnet.miners[0].weights(round=123)  # round is ignored
    assert got[subnet.uid(subnet.validator)] == dict(zip(miner_uids, [65535, 32768], strict=True))


def test_rate_limit_and_version_key_errors(subnet):
    v_uid, (m0, m1) = subnet.uid(subnet.validator), (subnet.uid(m) for m in subnet.miners)
    subnet.sudo("sudo_set_weights_set_rate_limit", weights_set_rate_limit=100)
    # LastUpdate (registration or the last weights) is < 100 blocks back.
    with pytest.raises(ChainError) as err:
        subnet.validator.set_weights(0, [m0, m1], [1.0, 1.0])
    assert err.value.code == "SettingWeightsTooFast"
    subnet.sudo("sudo_set_weights_set_rate_limit", weights_set_rate_limit=0)
    subnet.sudo("sudo_set_weights_version_key", weights_version_key=7)
    stale = SubtensorChain(
        subnet.node.ws_url, subnet.netuid, subnet.validator.keypair, version_key=6
    )
    with pytest.raises(ChainError) as err:
        stale.set_weights(0, [m0, m1], [1.0, 1.0])
    assert err.value.code == "IncorrectWeightVersionKey"
    assert subnet.validator.set_weights(0, [m1], [1.0]) > 0  # default: the subnet's version key
    assert subnet.validator.weights(0)[v_uid] == {m1: 65535}


def test_registering_twice_is_a_named_error(subnet):
    hotkey = subnet.miners[0].keypair.ss58_address
    with pytest.raises(ChainError) as err:
        params = {"netuid": subnet.netuid, "hotkey": hotkey}
        subnet.admin.submit("SubtensorModule", "burned_register", params)
    assert err.value.code == "HotKeyAlreadyRegisteredInSubNet"


def test_commitment_round_trip(subnet):
    m0, m1 = subnet.miners
    b0 = m0.commit(5, digest("a0"))
    b1 = m1.commit(5, digest("a1"))
    assert b0 < b1 == subnet.admin.block()
    got = subnet.validator.commitments(5)
    assert [(c.hotkey, c.round, c.digest, c.block) for c in got] == [
        (m0.keypair.ss58_address, 5, digest("a0"), b0),
        (m1.keypair.ss58_address, 5, digest("a1"), b1),
    ]
    assert subnet.validator.commitments(4) == []
    m0.commit(6, digest("b0"))  # one commitment per hotkey: round 6 replaces round 5
    assert [c.hotkey for c in subnet.validator.commitments(5)] == [m1.keypair.ss58_address]
    (later,) = subnet.validator.commitments(6)
    assert (later.hotkey, later.digest) == (m0.keypair.ss58_address, digest("b0"))


def test_checkpoint_and_task_records(subnet):
    owner, reader = subnet.admin, subnet.miners[0]  # records live in the subnet owner's commitment
    assert reader.latest_checkpoint() is None and reader.checkpoint(0) is None
    with pytest.raises(ChainError) as err:
        reader.task()
    assert err.value.code == "NoTask"
    block = owner.publish_checkpoint(3, digest("merged"), "hf://m/c", digest("deltas"))
    checkpoint = reader.latest_checkpoint()
    assert reader.checkpoint(3) == checkpoint and reader.checkpoint(4) is None
    assert (checkpoint.round, checkpoint.block, checkpoint.uri) == (3, block, "hf://m/c")
    assert checkpoint.digest == digest("merged") and checkpoint.deltas_digest == digest("deltas")
    assert checkpoint.publisher == owner.keypair.ss58_address
    assert reader.latest_checkpoint(before_round=4) == checkpoint
    with pytest.raises(ChainError) as err:
        reader.checkpoint(2)  # replaced by round 3's: chain state keeps the latest only
    assert err.value.code == "unsupported"
    hashes = [digest("base"), digest("assignment"), digest("data")]
    task_id = owner.publish_task(*hashes, "hf://m/task")
    assert reader.task() == Task(task_id, *hashes, "hf://m/task")
    assert owner.publish_task(*hashes, "hf://m/task2") == task_id + 1
    after = reader.latest_checkpoint()  # the task writes kept the checkpoint record
    assert (after.round, after.digest, after.uri) == (3, checkpoint.digest, "hf://m/c")


def test_commit_reveal_v2_turned_on_by_sudo(subnet):
    """Commit in one epoch, reveal in the next: the hash is what the runtime checks, the salt
    is the caller's (a restarted client reveals from the kept salt), a wrong salt is refused."""
    validator = subnet.validator
    hotkey = validator.keypair.ss58_address
    uids = [subnet.uid(m) for m in subnet.miners]
    subnet.sudo("sudo_set_commit_reveal_weights_enabled", enabled=True)
    if subnet.blocks_to_epoch() < 3:  # the commit and the early reveal land in one epoch
        subnet.node.new_blocks(subnet.blocks_to_epoch())
    try:
        assert validator.commit_reveal_enabled()
        assert validator.weight_commitment(0, hotkey) is None
        block = validator.commit_weights(0, uids, [0.25, 1.0], SALT)
        version = validator._read(lambda si: validator._version_key(si))
        want = commit_hash(
            validator.keypair.public_key,
            subnet.netuid,
            uids,
            [16384, 65535],
            salt_words(SALT),
            version,
        )
        assert subnet.admin.weight_commitment(0, hotkey) == want.hex()
        # With a schedule, only a commit made within the asked round counts.
        scheduled = SubtensorChain(subnet.node.ws_url, subnet.netuid, schedule=Schedule())
        r = block // Schedule().round_length  # start_block 0
        assert scheduled.weight_commitment(r, hotkey) == want.hex()
        assert scheduled.weight_commitment(r + 1, hotkey) is None
        (held,) = validator.weight_commits(hotkey)
        assert (held.digest, held.block) == (want.hex(), block)
        assert held.first_reveal_block > block and subnet.epoch_block(held.first_reveal_block - 1)
        with pytest.raises(ChainError) as err:
            validator.set_weights(0, uids, [0.25, 1.0], SALT)
        assert err.value.code == "RevealTooEarly"
        subnet.node.new_blocks(held.first_reveal_block - 1 - validator.block())
        restarted = SubtensorChain(subnet.node.ws_url, subnet.netuid, validator.keypair)
        with pytest.raises(ChainError) as err:
            restarted.set_weights(0, uids, [0.25, 1.0], bytes(32))
        assert err.value.code == "InvalidRevealCommitHashNotMatch"
        assert restarted.set_weights(0, uids, [0.25, 1.0], SALT) <= held.last_reveal_block
        got = subnet.admin.weights(0)[subnet.uid(validator)]
        assert got == dict(zip(uids, [16384, 65535], strict=True))
        assert validator.weight_commitment(0, hotkey) is None  # revealed: nothing pending
    finally:
        subnet.sudo("sudo_set_commit_reveal_weights_enabled", enabled=False)


def test_call_names_come_from_the_runtime_metadata(subnet):
    chain = subnet.miners[0]
    # spec 293 predates commit_timelocked_weights (August 2025): the older call is chosen.
    timelocked = chain.available_call(
        "SubtensorModule", "commit_timelocked_weights", "commit_crv3_weights"
    )
    assert timelocked == "commit_crv3_weights"
    assert chain.available_call("SubtensorModule", "reveal_weights") == "reveal_weights"
    with pytest.raises(ChainError) as err:
        chain.available_call("SubtensorModule", "set_mechanism_weights")
    assert err.value.code == "unsupported"
    with pytest.raises(ChainError):
        chain.available_call("NoSuchPallet", "x")


def test_without_commit_reveal_commit_weights_sends_nothing(subnet):
    validator = subnet.validator
    nonce = _nonce(validator)
    assert validator.commit_weights(0, [2], [1.0], SALT) == validator.block()
    assert _nonce(validator) == nonce
    assert validator.weight_commitment(0, validator.keypair.ss58_address) is None


def test_read_only_chain_cannot_sign(subnet):
    reader = SubtensorChain(subnet.node.ws_url, subnet.netuid)
    assert len(reader.members()) >= 4
    with pytest.raises(ValueError, match="read-only"):
        reader.set_weights(0, [1], [1.0])


def test_identity_label_and_schedule(subnet):
    miner = subnet.miners[0]
    assert miner.identity() == miner.keypair.ss58_address
    assert miner.label() == f"subtensor:{subnet.netuid}"
    with pytest.raises(ChainError) as err:
        miner.schedule()  # subtensor keeps none
    assert err.value.code == "unsupported"
    reader = SubtensorChain(subnet.node.ws_url, subnet.netuid, schedule=Schedule(start_block=7))
    assert reader.identity() is None and reader.schedule() == Schedule(start_block=7)


def test_unknown_netuid_and_unreachable_endpoint(subnet):
    with pytest.raises(ValueError, match="netuid 999 does not exist"):
        SubtensorChain(subnet.node.ws_url, 999)
    with pytest.raises(ChainError) as err:
        SubtensorChain(f"ws://127.0.0.1:{free_port()}", subnet.netuid, retries=2, backoff=0.01)
    assert err.value.code == "Unreachable"


def _nonce(chain: SubtensorChain) -> int:
    address = chain.keypair.ss58_address
    return chain._read(lambda si: si.query("System", "Account", [address]).value["nonce"])


@pytest.mark.parametrize("reached_node", [True, False])
def test_lost_answer_is_resolved_without_double_sending(subnet, monkeypatch, reached_node):
    """The connection dies while submitting: after (landed) or before (not sent) the send.

    Either way submit() returns the one inclusion, and the account nonce moves by exactly one.
    """
    from websocket import WebSocketConnectionClosedException

    key = subnet.miners[1].keypair
    chain = SubtensorChain(subnet.node.ws_url, subnet.netuid, key, backoff=0.01)
    si = chain._conn()
    sends = []

    def flaky_submit(extrinsic, **_):
        sends.append(extrinsic)
        if reached_node:  # the node gets it (and builds its block), the answer is lost
            subnet.node.rpc("author_submitExtrinsic", [str(extrinsic.data)])
        raise WebSocketConnectionClosedException("connection lost")

    monkeypatch.setattr(si, "submit_extrinsic", flaky_submit)  # this connection only
    before = _nonce(chain)
    uid = subnet.uid(chain)
    landed = chain.submit("SubtensorModule", "set_weights", _self_weight(chain, uid))
    assert len(sends) == 1
    assert _nonce(chain) == before + 1
    assert landed.block == chain.block()
    assert chain.weights(0)[uid] == {uid: 65535}


def _self_weight(chain: SubtensorChain, uid: int) -> dict:
    params = [chain.netuid]
    version = chain._read(lambda si: si.query("SubtensorModule", "WeightsVersionKey", params))
    return {"netuid": chain.netuid, "dests": [uid], "weights": [1], "version_key": version.value}
