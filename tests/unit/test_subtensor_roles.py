"""Roles on `[chain] kind = "subtensor"` without a node: the [chain] checks, what open_chain
refuses before connecting, the run-time checks of `moesaic <role> run`, and the rule that
narrows subtensor's weights (each validator's latest only) to the ones set within a round.
tests/integration/test_validator_subtensor.py runs the validator on a real subtensor runtime.
"""

from __future__ import annotations

import pytest

from moesaic.config import check_runnable, from_dict
from protocol.chain import open_chain
from protocol.chain.subtensor import rows_of_round
from protocol.config import ChainConfig, RoundSchedule, describe_tables, load_toml
from protocol.identity.keys import load_signer

WS = "ws://127.0.0.1:9944"
SUBTENSOR = {"kind": "subtensor", "rpc": WS, "netuid": 3, "schedule": {"start_block": 7}}


def test_a_subtensor_chain_section_loads_and_describes_itself(tmp_path):
    config = from_dict({"chain": {**SUBTENSOR, "wallet_name": "validator"}})
    chain = config.chain
    assert (chain.kind, chain.rpc, chain.netuid, chain.wallet_name) == (
        "subtensor",
        WS,
        3,
        "validator",
    )
    assert chain.schedule == RoundSchedule(start_block=7)  # the phases at their defaults
    text = describe_tables(config, ["chain"])
    assert "[chain.schedule]" in text and "start_block = 7" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert from_dict(load_toml(path)).chain == chain  # what --dry-run prints loads back


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rpc": "http://127.0.0.1:9944"},
            r"rpc \(the subtensor node's websocket\) must be a ws/wss",
        ),
        ({"netuid": None}, r"netuid is required"),
        ({"netuid": 0}, r"netuid must be a subnet's"),
        ({"netuid": 70000}, r"netuid must be a subnet's"),
        ({"schedule": None}, r"needs \[chain.schedule\]"),
        ({"schedule": {"evaluate": 0}}, r"\[chain.schedule\] evaluate must last at least one"),
        ({"schedule": {"start_block": -1}}, r"\[chain.schedule\] start_block"),
        ({"keystore": "k.json"}, r"keystore holds an Ethereum key"),
        ({"registry": "0x" + "11" * 20}, r"registry and chain_id are for kind 'evm'"),
        ({"chain_id": 945}, r"registry and chain_id are for kind 'evm'"),
        ({"publisher": "0xabc"}, r"publisher must be an ss58 hotkey"),
        ({"key_file": "k", "wallet_name": "w"}, r"exactly one key source"),
    ],
)
def test_bad_subtensor_sections_are_refused_at_load(changes, message):
    section = {k: v for k, v in {**SUBTENSOR, **changes}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        from_dict({"chain": section})


@pytest.mark.parametrize("key", ["netuid", "schedule", "publisher"])
def test_subtensor_keys_are_refused_for_evm(key):
    value = {"netuid": 3, "schedule": {}, "publisher": "5" * 48}[key]
    with pytest.raises(ValueError, match=rf"\[chain\] {key}: only for kind 'subtensor'"):
        from_dict({"chain": {"kind": "evm", key: value}})


def test_subtensor_evm_is_refused_with_a_message_saying_it_is_later():
    with pytest.raises(ValueError, match="not supported yet"):
        ChainConfig(kind="subtensor-evm")


def test_open_chain_refuses_an_ethereum_key_for_subtensor_before_connecting():
    config = ChainConfig(kind="subtensor", rpc=WS, netuid=3, schedule=RoundSchedule())
    eth = load_signer("0x" + "ab" * 32)
    # Nothing listens on WS: the refusal comes before any connection is tried.
    with pytest.raises(ValueError, match="sends with an sr25519 key"):
        open_chain(config, eth)


def test_check_runnable_on_subtensor(tmp_path):
    base, assignment = tmp_path / "base", tmp_path / "a.json"
    base.mkdir()
    assignment.write_text("{}")
    task = {"base_dir": str(base), "assignment": str(assignment)}
    no_key = from_dict({"chain": SUBTENSOR, "task": task, "validator": {"state_dir": "v"}})
    with pytest.raises(ValueError, match="wallet_name or key_file is required"):
        check_runnable(no_key, "validator")
    # A wallet is the key source and no registry is asked for (the zero placeholder stays).
    wallet = from_dict(
        {"chain": {**SUBTENSOR, "wallet_name": "v"}, "task": task, "validator": {"state_dir": "v"}}
    )
    check_runnable(wallet, "validator")
    evm = from_dict({"chain": {"wallet_name": "v"}, "task": task, "validator": {"state_dir": "v"}})
    with pytest.raises(ValueError, match="placeholder zero address"):
        check_runnable(evm, "validator")


ROW_A, ROW_B = {2: 65535, 3: 100}, {3: 65535}


@pytest.mark.parametrize(
    ("last_update", "commits", "expected"),
    [
        # set_weights in the round (commit-reveal off): the row is the round's
        ([0, 25, 40], {}, {1: ROW_A, 2: ROW_B}),
        # validator 2 set its weights in the previous round: they hold, but are not this round's
        ([0, 25, 19], {}, {1: ROW_A}),
        # commit-reveal: committed in the round (LastUpdate moved) and revealed (commit consumed)
        ([0, 25, 40], {1: [], 2: [18]}, {1: ROW_A, 2: ROW_B}),
        # committed in the round, not revealed yet (or expired): the row is an older round's
        ([0, 25, 40], {2: [33]}, {1: ROW_A}),
        # a LastUpdate after the round (the next round's commit or set): not this round's
        ([0, 25, 41], {}, {1: ROW_A}),
        # a uid past LastUpdate's end (registered after the read): not the round's
        ([0, 25], {}, {1: ROW_A}),
    ],
)
def test_rows_of_round(last_update, commits, expected):
    rows = {1: ROW_A, 2: ROW_B}
    assert rows_of_round(rows, last_update, commits, (20, 40)) == expected
