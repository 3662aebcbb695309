"""The `subtensor-evm` backend: our registry on Bittensor EVM, weights through the neuron precompile.

On Bittensor EVM a validator's EVM key can set weights on a subnet through the neuron precompile
at 0x...0804 (`setWeights(uint16 netuid, uint16[] dests, uint16[] weights, uint64 versionKey)`),
acting as the ss58 mirror of its address. Emissions follow those weights. Everything else the
protocol needs (tasks, commitments, per-round weights, checkpoints) lives in our registry
contract, deployed on the same chain. So this backend composes an `EvmChain` and sends each
validator's weights to both: the registry keeps the per-round record every role reads, the
precompile makes them count on the subnet. Reads all come from the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.chain import Checkpoint, Commitment, Member, Task
from protocol.chain.evm import capped_u16_weights, send

if TYPE_CHECKING:
    from protocol.chain.evm import EvmChain
    from protocol.round.schedule import Schedule

NEURON_PRECOMPILE = "0x0000000000000000000000000000000000000804"
CHAIN_IDS = {"mainnet": 964, "testnet": 945, "localnet": 42}


def neuron_abi() -> list:
    """The neuron precompile's functions (the published ABI's signatures)."""
    u16s = {"type": "uint16[]"}
    return [
        {
            "type": "function",
            "name": "setWeights",
            "stateMutability": "payable",
            "inputs": [
                {"name": "netuid", "type": "uint16"},
                {"name": "dests", **u16s},
                {"name": "weights", **u16s},
                {"name": "versionKey", "type": "uint64"},
            ],
            "outputs": [],
        },
        {
            "type": "function",
            "name": "commitWeights",
            "stateMutability": "payable",
            "inputs": [
                {"name": "netuid", "type": "uint16"},
                {"name": "commitHash", "type": "bytes32"},
            ],
            "outputs": [],
        },
    ]


class SubtensorEvmChain:
    """A `Chain` for Bittensor EVM: registry reads and writes, plus subnet weights via precompile."""

    def __init__(
        self,
        registry: EvmChain,
        netuid: int,
        version_key: int = 0,
        precompile: str = NEURON_PRECOMPILE,
    ):
        if not 0 <= netuid < 2**16:
            raise ValueError(f"netuid {netuid} is not a u16")
        self.registry, self.netuid, self.version_key = registry, netuid, version_key
        self.neuron = registry.w3.eth.contract(address=precompile, abi=neuron_abi())

    @property
    def address(self) -> str | None:
        return self.registry.address

    def identity(self) -> str | None:
        return self.registry.identity()

    def label(self) -> str:
        # Manifests name the registry they are committed to, as on any EVM chain.
        return self.registry.label()

    def schedule(self) -> Schedule:
        return self.registry.schedule()

    def block(self) -> int:
        return self.registry.block()

    def block_hash(self, block: int) -> str:
        return self.registry.block_hash(block)

    def members(self) -> list[Member]:
        return self.registry.members()

    def commit(self, round: int, digest: str) -> int:
        return self.registry.commit(round, digest)

    def commitments(self, round: int) -> list[Commitment]:
        return self.registry.commitments(round)

    def commit_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        """Commit the round's weights in the registry (the subnet only ever sees the reveal)."""
        return self.registry.commit_weights(round, uids, weights, salt)

    def weight_commitment(self, round: int, hotkey: str) -> str | None:
        return self.registry.weight_commitment(round, hotkey)

    def set_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        """Reveal the round's weights in the registry, then set them on the subnet.

        The registry call runs first: it enforces the phase, commitment and once-per-round
        rules, so a rejected round never reaches the subnet.
        """
        block = self.registry.set_weights(round, uids, weights, salt)
        dests, values = capped_u16_weights(uids, weights)
        fn = self.neuron.functions.setWeights(self.netuid, dests, values, self.version_key)
        send(self.registry.w3, self.registry.account, fn)
        return block

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        return self.registry.weights(round)

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        return self.registry.publish_checkpoint(round, digest, uri, deltas_digest)

    def checkpoint(self, round: int) -> Checkpoint | None:
        return self.registry.checkpoint(round)

    def latest_checkpoint(self, before_round: int | None = None) -> Checkpoint | None:
        return self.registry.latest_checkpoint(before_round)

    def task(self) -> Task:
        return self.registry.task()
