"""The subtensor-evm backend on anvil, with a stand-in contract at the neuron precompile address.

The stand-in (contracts/NeuronPrecompileStandIn.sol) records what it receives, so these tests
check the exact calls a validator makes on Bittensor EVM: netuid, u16 max-upscaled weights,
version key, and the rate limit's revert surfacing as a named ChainError.
"""

from __future__ import annotations

import hashlib

import pytest

from protocol.chain import U16_MAX, Chain, ChainError
from protocol.round.schedule import Schedule, phase_bounds

LENGTHS = dict(train=3, commit=4, reveal=2, evaluate=2, weights=6, merge=3)


@pytest.fixture
def net(anvil_node, anvil_url):
    from protocol.chain.evm import EvmChain, artifact, deploy_registry
    from protocol.chain.subtensor_evm import NEURON_PRECOMPILE, SubtensorEvmChain

    code = artifact("NeuronPrecompileStandIn")["deployedBytecode"]
    anvil_node.w3.provider.make_request("anvil_setCode", [NEURON_PRECOMPILE, code])
    w3, accts = anvil_node.w3, anvil_node.accounts
    schedule = Schedule(start_block=w3.eth.block_number + 8, **LENGTHS)
    address = deploy_registry(w3, accts[0], schedule)
    owner = EvmChain(w3, address, accts[0])
    miners = [SubtensorEvmChain(EvmChain(w3, address, a), netuid=7) for a in accts[1:3]]
    validator = SubtensorEvmChain(EvmChain(w3, address, accts[3]), netuid=7, version_key=3)
    stand_in = w3.eth.contract(
        address=NEURON_PRECOMPILE, abi=artifact("NeuronPrecompileStandIn")["abi"]
    )
    return owner, miners, validator, stand_in, schedule, anvil_node


SALT = b"\x42" * 32  # the weights commitment's salt


def test_weights_reach_the_precompile_and_the_registry(net):
    owner, miners, validator, stand_in, schedule, node = net
    assert isinstance(validator, Chain)
    uids = [m.registry.register() for m in miners]
    owner.authorise_validator(validator.address)
    node.mine_to(phase_bounds(schedule, 0, "commit")[0])
    miners[0].commit(0, hashlib.sha256(b"a").hexdigest())
    assert [c.hotkey for c in validator.commitments(0)] == [miners[0].address]

    node.mine_to(phase_bounds(schedule, 0, "evaluate")[0])
    # The stand-in sits at the precompile address of a session-wide anvil: its storage may
    # hold this account's weights from other modules' tests. The commitment must not change it.
    before = stand_in.functions.weightsOf(validator.address).call()
    validator.commit_weights(0, uids, [1.0, 3.0], SALT)  # the subnet sees only the reveal
    assert stand_in.functions.weightsOf(validator.address).call() == before
    start = phase_bounds(schedule, 0, "weights")[0]
    node.mine_to(start)
    validator.set_weights(0, uids, [1.0, 3.0], SALT)
    dests, values = stand_in.functions.weightsOf(validator.address).call()
    assert list(dests) == uids and list(values) == [round(U16_MAX / 3), U16_MAX]
    (event,) = stand_in.events.WeightsSet().get_logs(from_block=start)
    assert (event.args.netuid, event.args.versionKey) == (7, 3)
    assert validator.weights(0) == {
        v: dict(zip(uids, values, strict=True)) for v in validator.weights(0)
    }


def test_precompile_rejection_is_a_named_error(net):
    owner, miners, validator, stand_in, schedule, node = net
    from protocol.chain.evm import send

    uids = [m.registry.register() for m in miners]
    owner.authorise_validator(validator.address)
    fn = validator.neuron.functions.setWeights(7, [uids[0], uids[0]], [1, 2], 0)
    with pytest.raises(ChainError) as e:
        send(node.w3, validator.registry.account, fn)
    assert e.value.code == "DuplicateUids"
    send(
        node.w3,
        validator.registry.account,
        validator.neuron.functions.setWeights(7, uids, [1, 2], 0),
    )
    with pytest.raises(ChainError) as e:
        send(
            node.w3,
            validator.registry.account,
            validator.neuron.functions.setWeights(7, uids, [1, 2], 0),
        )
    assert e.value.code == "SettingWeightsTooFast"


def test_registry_rules_apply_before_the_subnet_is_touched(net):
    owner, miners, validator, stand_in, schedule, node = net
    uids = [m.registry.register() for m in miners]
    owner.authorise_validator(validator.address)
    # The anvil node is shared by the session: compare with what the stand-in held before.
    before = stand_in.functions.lastSet(validator.address).call()
    with pytest.raises(ChainError) as e:  # train phase: the registry refuses first
        validator.set_weights(0, uids, [1.0, 1.0], SALT)
    assert e.value.code == "WrongPhase"
    assert stand_in.functions.lastSet(validator.address).call() == before


def test_bad_netuid():
    from protocol.chain.subtensor_evm import SubtensorEvmChain

    with pytest.raises(ValueError, match="u16"):
        SubtensorEvmChain(object(), netuid=70000)  # type: ignore[arg-type]
