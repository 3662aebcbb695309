"""SubtensorChain against a real subtensor runtime (chopsticks) and, opt-in, a live endpoint.

What is covered where:
- Here, on chopsticks running the testnet genesis runtime (spec_version 103, 2023; one node per
  module, see chopsticks.py): subnet creation and registration through Sudo, members() (uids,
  hotkeys, stake, validator permit before and after the first epoch), set_weights and weights()
  (stored normalised by the runtime), module errors decoded into ChainError codes
  (NoValidatorPermit, SettingWeightsTooFast after raising WeightsSetRateLimit,
  IncorrectNetworkVersionKey, RegistrationDisabled for burned_register on that runtime), block
  hashes (block 0 through System.BlockHash), ChainError("unsupported") for everything
  commitment-based (that runtime has no Commitments pallet), retry paths: an unreachable
  endpoint, and an answer lost after or before the extrinsic reached the node (found, not
  re-sent; or re-sent exactly once).
- Only against a live endpoint (set MOESAIC_SUBTENSOR_LIVE_WS to a ws URL, with
  MOESAIC_SUBTENSOR_LIVE_NETUID and MOESAIC_SUBTENSOR_LIVE_URI, a hotkey registered on that
  netuid; skipped otherwise): Commitments round trip, checkpoint and task records, and
  commit-reveal weights (commit hash checked against the runtime's WeightCommits storage).
- tests/unit/test_subtensor_encoding.py: the byte-exact encodings (commit hash, commitment
  payload and call params) and wallet hotkey loading, without any node.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from chopsticks import Chopsticks, free_port, running_chopsticks, sudo

from protocol.chain import Chain, ChainError, Member, Task
from protocol.chain.subtensor import Landed, PendingReveal, SubtensorChain, keypair_from

GENESIS_NETUID = 3  # the testfinney genesis state holds subnet 3 only
NETUID, TEMPO = 11, 10
STAKE = 10**12  # rao: 1000 TAO for the validator


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Subnet:
    """A subnet on chopsticks with a sudo admin (Alice), a staked validator and two miners."""

    node: Chopsticks
    admin: SubtensorChain
    validator: SubtensorChain
    miners: list[SubtensorChain]

    def sudo(self, function: str, **params) -> int:
        return sudo(self.admin, function, {"netuid": NETUID, **params})

    def blocks_to_epoch(self) -> int:
        """Blocks to build until the one running the next epoch (the runtime's tempo rule)."""
        head = self.admin.block()
        return next(b - head for b in range(head + 1, head + TEMPO + 2) if _epoch_block(b))

    def register(self, uri: str, stake: int = 0) -> SubtensorChain:
        return _register(self.node, self.admin, uri, stake)


def _register(node: Chopsticks, admin: SubtensorChain, uri: str, stake: int) -> SubtensorChain:
    """sudo_register a hotkey (coldkey: the admin) and return a chain client acting as it."""
    key = keypair_from(uri=uri)
    params = {"netuid": NETUID, "hotkey": key.ss58_address, "coldkey": admin.keypair.ss58_address}
    sudo(admin, "sudo_register", {**params, "stake": stake, "balance": 0})
    return SubtensorChain(node.ws_url, NETUID, key, timeout=30)


def _epoch_block(block: int) -> bool:
    return (block + NETUID + 1) % (TEMPO + 1) == TEMPO


@pytest.fixture(scope="module")
def subnet(tmp_path_factory) -> Iterator[Subnet]:
    with running_chopsticks(tmp_path_factory.mktemp("chopsticks")) as node:
        yield _open_subnet(node)


def _open_subnet(node: Chopsticks) -> Subnet:
    alice = keypair_from(uri="//Alice")
    node.set_sudo(alice.ss58_address)
    node.fund([alice.ss58_address])
    admin = SubtensorChain(node.ws_url, GENESIS_NETUID, alice, timeout=30)
    sudo(admin, "sudo_add_network", {"netuid": NETUID, "tempo": TEMPO, "modality": 0})
    admin = SubtensorChain(node.ws_url, NETUID, alice, timeout=30)
    # Defaults of that runtime would reject a 2-uid weight vector (min 1024 weights, capped at
    # 1000/65535 each): open them up, as a subnet owner would for a small subnet.
    sudo(admin, "sudo_set_min_allowed_weights", {"netuid": NETUID, "min_allowed_weights": 1})
    sudo(admin, "sudo_set_max_weight_limit", {"netuid": NETUID, "max_weight_limit": 65535})
    validator = _register(node, admin, "//moesaic-validator", STAKE)
    miners = [_register(node, admin, f"//moesaic-miner-{i}", 0) for i in range(2)]
    return Subnet(node, admin, validator, miners)


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
    hotkeys = [c.keypair.ss58_address for c in (subnet.validator, *subnet.miners)]
    assert [(m.uid, m.hotkey) for m in members] == list(enumerate(hotkeys))
    assert [m.stake for m in members] == [STAKE / 1e9, 0.0, 0.0]
    assert all(isinstance(m, Member) for m in members)
    subnet.node.new_blocks(subnet.blocks_to_epoch())
    assert subnet.validator.members()[0].validator_permit
    assert subnet.validator.uid_of(hotkeys[2]) == 2
    assert subnet.validator.uid_of(subnet.admin.keypair.ss58_address) is None


def test_no_validator_permit_until_an_epoch_runs(subnet):
    if subnet.blocks_to_epoch() <= 3:  # registration + attempt must land before the epoch
        subnet.node.new_blocks(subnet.blocks_to_epoch())
    late = subnet.register("//moesaic-late", stake=STAKE)
    with pytest.raises(ChainError) as err:
        late.set_weights(0, [0, 1], [1.0, 1.0])
    assert err.value.code == "NoValidatorPermit"  # NeuronNoValidatorPermit on newer runtimes


def test_set_weights_and_read_back(subnet):
    subnet.node.new_blocks(subnet.blocks_to_epoch())
    miner_uids = [1, 2]
    block = subnet.validator.set_weights(0, miner_uids, [1.0, 0.5])
    assert block == subnet.validator.block()
    # Sent max-upscaled [65535, 32768]; stored as x * 65535 // sum (sums to ~65535).
    sent = [65535, 32768]
    stored = {uid: w * 65535 // sum(sent) for uid, w in zip(miner_uids, sent, strict=True)}
    got = subnet.miners[0].weights(round=123)  # round is ignored
    assert got[0] == stored
    assert 65535 - len(sent) <= sum(got[0].values()) <= 65535


def test_rate_limit_and_version_key_errors(subnet):
    subnet.node.new_blocks(subnet.blocks_to_epoch())
    subnet.sudo("sudo_set_weights_set_rate_limit", weights_set_rate_limit=100)
    # LastUpdate (registration or the last weights) is < 100 blocks back.
    with pytest.raises(ChainError) as err:
        subnet.validator.set_weights(0, [1, 2], [1.0, 1.0])
    assert err.value.code == "SettingWeightsTooFast"
    subnet.sudo("sudo_set_weights_set_rate_limit", weights_set_rate_limit=0)
    subnet.sudo("sudo_set_weights_version_key", weights_version_key=7)
    stale = SubtensorChain(subnet.node.ws_url, NETUID, subnet.validator.keypair, version_key=6)
    with pytest.raises(ChainError) as err:
        stale.set_weights(0, [1, 2], [1.0, 1.0])
    assert err.value.code == "IncorrectNetworkVersionKey"
    assert subnet.validator.set_weights(0, [2], [1.0]) > 0  # default: the subnet's version key
    assert subnet.validator.weights(0)[0] == {2: 65535}


def test_burned_register_error_is_decoded(subnet):
    coldkey = keypair_from(uri="//moesaic-coldkey")
    subnet.node.fund([coldkey.ss58_address])
    chain = SubtensorChain(subnet.node.ws_url, NETUID, coldkey)
    hotkey = keypair_from(uri="//moesaic-burned").ss58_address
    with pytest.raises(ChainError) as err:
        chain.submit("SubtensorModule", "burned_register", {"netuid": NETUID, "hotkey": hotkey})
    assert err.value.code == "RegistrationDisabled"  # that 2023 runtime's rule


def test_commitments_checkpoints_and_task_are_unsupported_there(subnet):
    miner = subnet.miners[0]
    calls = [
        lambda: miner.commit(0, digest("artifact")),
        lambda: miner.commitments(0),
        lambda: miner.publish_checkpoint(0, digest("merged"), "file:///c", digest("deltas")),
        miner.latest_checkpoint,
        lambda: miner.checkpoint(0),
        miner.task,
    ]
    for call in calls:
        with pytest.raises(ChainError) as err:
            call()
        assert err.value.code == "unsupported"
        assert "Commitments" in err.value.message


def test_read_only_chain_cannot_sign(subnet):
    reader = SubtensorChain(subnet.node.ws_url, NETUID)
    assert len(reader.members()) >= 3
    with pytest.raises(ValueError, match="read-only"):
        reader.set_weights(0, [1], [1.0])


def test_identity_label_and_schedule(subnet):
    from protocol.round.schedule import Schedule

    miner = subnet.miners[0]
    assert miner.identity() == miner.keypair.ss58_address
    assert miner.label() == f"subtensor:{NETUID}"
    with pytest.raises(ChainError) as err:
        miner.schedule()  # subtensor keeps none
    assert err.value.code == "unsupported"
    reader = SubtensorChain(subnet.node.ws_url, NETUID, schedule=Schedule(start_block=7))
    assert reader.identity() is None and reader.schedule() == Schedule(start_block=7)


def test_unknown_netuid_and_unreachable_endpoint(subnet):
    with pytest.raises(ValueError, match="netuid 999 does not exist"):
        SubtensorChain(subnet.node.ws_url, 999)
    with pytest.raises(ChainError) as err:
        SubtensorChain(f"ws://127.0.0.1:{free_port()}", NETUID, retries=2, backoff=0.01)
    assert err.value.code == "Unreachable"


def test_reveal_due_schedules_by_the_subnet_tempo(subnet, monkeypatch):
    """Pending commit-reveal weights: revealed in epoch(commit) + 1, kept before, dropped after.

    That runtime has no commit-reveal, so reveal_weights is captured instead of sent; the epoch
    arithmetic runs on the subnet's real Tempo (RevealPeriodEpochs absent: 1 epoch).
    """
    chain = subnet.validator
    sent = []
    monkeypatch.setattr(chain, "submit", lambda *call: sent.append(call) or Landed(7, "", "", []))
    subnet.node.new_blocks(2 * (TEMPO + 1) - chain.block())  # an expired commit needs history
    next_block = chain.block() + 1
    due, future, expired = (next_block - k * (TEMPO + 1) for k in (1, 0, 2))
    chain.pending = [PendingReveal(b, [1], [65535], [b % 65536], 0) for b in (due, future, expired)]
    assert chain.reveal_due() == [7]
    (module, function, params), *more = sent
    assert (module, function, more) == ("SubtensorModule", "reveal_weights", [])
    want = {"netuid": NETUID, "uids": [1], "values": [65535], "salt": [due % 65536]}
    assert params == {**want, "version_key": 0}
    assert [p.commit_block for p in chain.pending] == [future]
    chain.pending = []


def _nonce(chain: SubtensorChain) -> int:
    address = chain.keypair.ss58_address
    return chain._read(lambda si: si.query("System", "Account", [address]).value["nonce"])


@pytest.mark.parametrize("reached_node", [True, False])
def test_lost_answer_is_resolved_without_double_sending(subnet, monkeypatch, reached_node):
    """The connection dies while submitting: after (landed) or before (not sent) the send.

    Either way submit() returns the one inclusion, and the account nonce moves by exactly one.
    """
    from websocket import WebSocketConnectionClosedException

    chain = SubtensorChain(subnet.node.ws_url, NETUID, subnet.miners[1].keypair, backoff=0.01)
    si = chain._conn()
    sends = []

    def flaky_submit(extrinsic, **_):
        sends.append(extrinsic)
        if reached_node:  # the node gets it (and builds its block), the answer is lost
            subnet.node.rpc("author_submitExtrinsic", [str(extrinsic.data)])
        raise WebSocketConnectionClosedException("connection lost")

    monkeypatch.setattr(si, "submit_extrinsic", flaky_submit)  # this connection only
    before = _nonce(chain)
    landed = chain.submit("SubtensorModule", "set_weights", _self_weight(chain, 2))
    assert len(sends) == 1
    assert _nonce(chain) == before + 1
    assert landed.block == chain.block()
    assert chain.weights(0)[2] == {2: 65535}


def _self_weight(chain: SubtensorChain, uid: int) -> dict:
    version = chain._read(lambda si: si.query("SubtensorModule", "WeightsVersionKey", [NETUID]))
    return {"netuid": NETUID, "dests": [uid], "weights": [1], "version_key": version.value}


# ---------------------------------------------------------------------------- live endpoint

LIVE_WS = os.environ.get("MOESAIC_SUBTENSOR_LIVE_WS")
live = pytest.mark.skipif(not LIVE_WS, reason="set MOESAIC_SUBTENSOR_LIVE_WS to a subtensor ws URL")


@pytest.fixture
def live_chain() -> SubtensorChain:
    netuid = int(os.environ.get("MOESAIC_SUBTENSOR_LIVE_NETUID", "1"))
    key = keypair_from(uri=os.environ.get("MOESAIC_SUBTENSOR_LIVE_URI", "//Alice"))
    chain = SubtensorChain(LIVE_WS, netuid, key, publisher=key.ss58_address, timeout=120)
    if chain.uid_of(key.ss58_address) is None:
        raise AssertionError(f"{key.ss58_address} is not registered on netuid {netuid}")
    return chain


@live
def test_live_commitment_round_trip(live_chain):
    rnd, d = live_chain.block(), digest(f"live-{os.getpid()}")
    block = live_chain.commit(rnd, d)
    mine = [c for c in live_chain.commitments(rnd) if c.hotkey == live_chain.keypair.ss58_address]
    assert [(c.digest, c.block) for c in mine] == [(d, block)]


@live
def test_live_checkpoint_and_task_records(live_chain):
    rnd = live_chain.block()
    block = live_chain.publish_checkpoint(rnd, digest("merged"), "hf://m/c", digest("deltas"))
    checkpoint = live_chain.latest_checkpoint()
    assert live_chain.checkpoint(rnd) == checkpoint
    assert (checkpoint.round, checkpoint.block, checkpoint.uri) == (rnd, block, "hf://m/c")
    assert checkpoint.digest == digest("merged") and checkpoint.deltas_digest == digest("deltas")
    hashes = [digest("base"), digest("assignment"), digest("data")]
    task_id = live_chain.publish_task(*hashes, "hf://m/task")
    assert live_chain.task() == Task(task_id, *hashes, "hf://m/task")
    after = live_chain.latest_checkpoint()  # the task write kept the checkpoint record
    assert (after.round, after.digest, after.uri) == (rnd, checkpoint.digest, "hf://m/c")


@live
def test_live_commit_reveal_hash_matches_runtime(live_chain):
    from protocol.chain.subtensor import commit_hash

    enabled = live_chain._read(
        lambda si: si.query("SubtensorModule", "CommitRevealWeightsEnabled", [live_chain.netuid])
    )
    if not enabled.value:
        pytest.skip("commit-reveal is off on this netuid")
    own_uid = live_chain.uid_of(live_chain.keypair.ss58_address)
    live_chain.set_weights(0, [own_uid], [1.0])  # a self-weight needs no validator permit
    pending = live_chain.pending[-1]
    want = commit_hash(
        live_chain.keypair.public_key,
        live_chain.netuid,
        pending.uids,
        pending.values,
        pending.salt,
        pending.version_key,
    )
    hotkey = live_chain.keypair.ss58_address
    stored = live_chain._read(
        lambda si: si.query("SubtensorModule", "WeightCommits", [live_chain.netuid, hotkey])
    )
    assert "0x" + want.hex() in str(stored.value)
