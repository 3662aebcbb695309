"""The validator role on a subtensor subnet: chopsticks running spec 293, commit-reveal on.

The validator's key is a Bittensor wallet on disk (btcli layout, hotkey only) and its chain is
opened from a TOML [chain] section with kind = "subtensor" (load_config -> connect ->
open_chain), as `moesaic validator run` does. The subnet is the one test_chain_subtensor.py
sets up (tempo 10, a staked validator and two miners by burned registration), with
commit-reveal v2 turned on by sudo. The round schedule is aligned with the subnet's epochs: a
round is two epochs and each weights phase opens an epoch, so weights committed in the
evaluate phase are revealed in the next epoch, as the runtime requires.

No miner submits in these rounds, so no model is loaded: the weights come from the averages
of an earlier round (a seeded state file) decaying by the EMA rule, which is enough to see them
land on the subnet's own uids (hotkey -> uid from the chain, a deregistered hotkey dropped).

1. A validator killed right after its commit_weights extrinsic landed (before recording it)
   is started again from the same state: it sees its commitment on chain, does not commit
   again, and reveals with the salt its round state kept.
2. `moesaic validator run` runs the next round as a process would (blocks built meanwhile):
   the weights of the earlier round do not count as this round's; it commits and reveals again.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
from chopsticks import running_chopsticks
from test_chain_subtensor import STAKE, TEMPO, _open_subnet, _register

from moesaic.cli import main
from moesaic.config import load_config
from protocol.chain import open_chain, u16_weights
from protocol.chain.subtensor import keypair_from
from protocol.identity.hashing import sha256_dir
from protocol.moe.experts import METHODS, Assignment
from protocol.round.runtime import connect, role_context
from protocol.round.schedule import phase_bounds, position
from protocol.round.state import STATE_VERSION, RoundStore
from validator.node import build

# A round of two epochs (tempo 10: 11 blocks each); the weights phase starts at block 13.
PHASES = dict(train=3, commit=3, reveal=2, evaluate=5, weights=6, merge=3)
WEIGHTS_AT = PHASES["train"] + PHASES["commit"] + PHASES["reveal"] + PHASES["evaluate"]
VALIDATOR_URI = "//moesaic-wallet-validator"
GONE = "5" + "C" * 47  # a hotkey with credit that is not registered on the subnet


class Killed(BaseException):
    """The process died (not an error any step may catch)."""


class DiesAfterCommitting:
    """A chain client whose process is killed right after its commit_weights extrinsic."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def commit_weights(self, *args):
        self.inner.commit_weights(*args)
        raise Killed


def aligned_start(netuid: int) -> int:
    """A start block whose rounds' weights phases each open an epoch: the runtime's epoch of
    block b is (b + netuid + 1) // (tempo + 1)."""
    return -(WEIGHTS_AT + netuid + 1) % (TEMPO + 1)


def write_wallet(root: Path, keypair) -> None:
    """A btcli wallet holding only the hotkey (unencrypted JSON, mode 0600)."""
    hotkeys = root / "validator" / "hotkeys"
    hotkeys.mkdir(parents=True)
    doc = {
        "privateKey": "0x" + keypair.private_key.hex(),
        "publicKey": "0x" + keypair.public_key.hex(),
        "ss58Address": keypair.ss58_address,
    }
    path = hotkeys / "default"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)


def stand_in_task(root: Path) -> tuple[Path, Path]:
    """A base directory and an assignment selected on it. No submission reaches evaluation in
    these rounds, so the validator never loads a model from it."""
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    assignment = root / "assignment.json"
    Assignment({0: (0,)}, METHODS[0], 0.3, sha256_dir(base), 4).save(assignment)
    return base, assignment


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    work = tmp_path_factory.mktemp("validator_subtensor")
    with running_chopsticks(work) as node:
        subnet = _open_subnet(node)
        validator = _register(node, subnet.admin, VALIDATOR_URI, STAKE)
        write_wallet(work / "wallets", validator.keypair)
        subnet.sudo("sudo_set_commit_reveal_weights_enabled", enabled=True)
        node.new_blocks(subnet.blocks_to_epoch())  # the epoch grants the validator its permit
        base, assignment = stand_in_task(work)
        config = work / "validator.toml"
        config.write_text(
            f"""
[chain]
kind = "subtensor"
rpc = "{node.ws_url}"
netuid = {subnet.netuid}
wallet_name = "validator"
wallet_path = "{work / "wallets"}"

[chain.schedule]
start_block = {aligned_start(subnet.netuid)}
{chr(10).join(f"{k} = {v}" for k, v in PHASES.items())}

[store]
uri = "file://{work / "store"}"

[task]
base_dir = "{base}"
assignment = "{assignment}"

[validator]
state_dir = "{work / "validator"}"

[run]
poll_s = 0.2
"""
        )
        yield dataclasses.make_dataclass("Network", ["node", "subnet", "config", "state"])(
            node, subnet, config, work / "validator"
        )


def mine_to(node):
    """A `wait` for tests: build blocks until the chain is at `block`."""

    def wait(block: int) -> None:
        head = node.head()
        if head < block:
            node.new_blocks(block - head)

    return wait


def open_validator(network, *, dies_after_commit: bool = False):
    config = load_config(network.config)
    chain, store, signer = connect(config)  # the wallet's hotkey through open_chain
    if dies_after_commit:
        chain = DiesAfterCommitting(chain)
    ctx = role_context(config, chain, store, signer, Path(config.validator.state_dir))
    return build(ctx, config.validator, config.task), config


def test_restarted_validator_reveals_with_its_kept_salt(network):
    node, subnet = network.node, network.subnet
    miners = [m.keypair.ss58_address for m in subnet.miners]
    validator, config = open_validator(network, dies_after_commit=True)
    hotkey = validator.hotkey
    assert hotkey == keypair_from(uri=VALIDATOR_URI).ss58_address  # the wallet's hotkey
    r = position(validator.schedule, node.head()).round + 1
    averages = {miners[0]: 0.6, miners[1]: 0.2, GONE: 0.9}
    RoundStore(network.state).save(
        r - 1, {"version": STATE_VERSION, "round": r - 1, "score": {"averages": averages}}
    )
    with pytest.raises(Killed):
        validator.run_round(r, mine_to(node))
    state = RoundStore(network.state).load(r)
    assert "weights_salt" in state and "commit_weights" not in state
    reader = open_chain(config.chain)  # read-only
    assert reader.weight_commitment(r, hotkey) is not None  # it landed before the kill

    restarted, _ = open_validator(network)
    record = restarted.run_round(r, mine_to(node))
    assert record["commit_weights"]["status"] == "already_on_chain"  # not committed twice
    assert record["set_weights"]["status"] == "sent"
    assert reader.weight_commitment(r, hotkey) is None  # revealed: nothing pending

    # The subnet's own uids, from the chain; the unregistered hotkey gets nothing.
    uids = record["score"]["uids"]
    assert {h: uids[h] for h in miners} == {h: reader.uid_of(h) for h in miners}
    assert GONE not in uids and GONE not in record["score"]["averages"]
    sent = record["score"]["weights"]
    expected = dict(zip(*u16_weights(sent["uids"], sent["weights"]), strict=True))
    own = reader.uid_of(hotkey)
    assert reader.weights(r)[own] == expected
    assert expected[uids[miners[0]]] == 65535 > expected[uids[miners[1]]] > 0
    assert record["set_weights"]["on_chain"] == {str(u): v for u, v in sorted(expected.items())}
    # Weights hold on subtensor until replaced, but they are round r's, not round r+1's.
    assert own not in reader.weights(r + 1)


def test_validator_run_command_sets_the_next_rounds_weights(network):
    node = network.node
    config = load_config(network.config)
    reader = open_chain(config.chain)
    r = position(reader.schedule(), node.head()).round + 1
    mine_to(node)(phase_bounds(reader.schedule(), r, "train")[0])
    own = reader.uid_of(keypair_from(uri=VALIDATOR_URI).ss58_address)
    assert own not in reader.weights(r)  # the earlier round's weights are not this one's

    stop = threading.Event()

    def build_blocks():  # what a live chain does meanwhile: one block every ~12 s, faster
        while not stop.wait(0.3):
            node.new_blocks(1)

    builder = threading.Thread(target=build_blocks, daemon=True)
    builder.start()
    try:
        args = ["validator", "run", "--config", str(network.config), "--set", "run.rounds=1"]
        assert main(args) == 0
    finally:
        stop.set()
        builder.join(timeout=30)
    record = RoundStore(network.state).load(r)
    assert record["commit_weights"]["status"] == "sent"
    assert record["set_weights"]["status"] == "sent"
    sent = record["score"]["weights"]
    expected = dict(zip(*u16_weights(sent["uids"], sent["weights"]), strict=True))
    assert expected and reader.weights(r)[own] == expected
