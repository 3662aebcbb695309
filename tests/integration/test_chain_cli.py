"""A subnet owner's setup from the command line, on anvil: deploy, members, roles, the task.

.venv/bin/python -m pytest -q tests/integration/test_chain_cli.py

Every step of docs/guides/subnet-owner.md that touches the chain is a `moesaic chain` command
here, and the registry read back with EvmChain must hold what the commands said they did.
"""

from __future__ import annotations

from moesaic.cli import main
from protocol.chain.evm import EvmChain
from protocol.identity.hashing import sha256_dir
from protocol.moe.experts import Assignment


def _key(account) -> str:
    return account.key.to_0x_hex()


def test_owner_sets_up_a_network_with_the_cli(
    anvil_url, anvil_node, test_base, test_assignment, capsys
):
    owner, miner, validator, merger = anvil_node.accounts[:4]
    assert main(["chain", "deploy", "--rpc", anvil_url, "--key", _key(owner)]) == 0
    registry = capsys.readouterr().out.split()[1]
    at = ["--rpc", anvil_url, "--registry", registry]

    for member in (miner, validator):
        assert main(["chain", "register", *at, "--key", _key(member)]) == 0
    said = capsys.readouterr().out
    assert f"registered {miner.address} as uid: 0" in said
    assert main(["chain", "authorise-validator", validator.address, *at, "--key", _key(owner)]) == 0
    assert main(["chain", "set-merger", merger.address, *at, "--key", _key(owner)]) == 0
    task = ["--base", str(test_base), "--assignment", str(test_assignment), "--data", "corpus:math"]
    assert main(["chain", "publish-task", *task, *at, "--key", _key(owner)]) == 0
    assert "published task, id: 0" in capsys.readouterr().out

    chain = EvmChain(anvil_node.w3, registry)
    members = {m.hotkey: m for m in chain.members()}
    assert set(members) == {miner.address, validator.address}
    assert members[validator.address].validator_permit
    assert not members[miner.address].validator_permit
    task0 = chain.task()
    assert task0.task_id == 0 and task0.uri == "corpus:math"
    assert task0.base_hash == sha256_dir(test_base)
    assert task0.assignment_hash == Assignment.load(test_assignment).hash()

    # Only the owner may hand out roles: the revert is one line naming the contract's error.
    assert main(["chain", "set-merger", miner.address, *at, "--key", _key(miner)]) == 2
    assert "NotOwner" in capsys.readouterr().err
    assert main(["chain", "status", *at]) == 0
    status = capsys.readouterr().out
    assert "members   2" in status and validator.address in status


def test_publish_task_refuses_an_assignment_of_another_base(
    anvil_url, anvil_node, test_assignment, tmp_path, capsys
):
    owner = anvil_node.accounts[0]
    other = tmp_path / "other-base"
    assert (
        main(["base", "build", "--preset", "test", "--out", str(other), "--seed", "7", "--quiet"])
        == 0
    )
    assert main(["chain", "deploy", "--rpc", anvil_url, "--key", _key(owner)]) == 0
    registry = capsys.readouterr().out.split()[1]
    task = ["--base", str(other), "--assignment", str(test_assignment), "--data", "corpus:math"]
    at = ["--rpc", anvil_url, "--registry", registry, "--key", _key(owner)]
    assert main(["chain", "publish-task", *task, *at]) == 2
    assert "was selected on base" in capsys.readouterr().err
