"""One chain interface for every role, with real backends.

Backends: `evm` (our registry contract on any EVM chain, including Bittensor EVM),
`subtensor` (Bittensor's native chain through substrate-interface), `subtensor-evm` (weights
through the Bittensor neuron precompile), and `fake` (in-memory, unit tests only; the
conformance suite runs the same cases on it and on the real backends).

Everything here is plain data; backends import their heavy libraries lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

U16_MAX = 65535


class ChainError(RuntimeError):
    """A chain call failed for a reason the caller should see (reverted, rate-limited, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Member:
    uid: int
    hotkey: str  # ss58 address (subtensor) or 0x checksummed address (EVM)
    stake: float
    validator_permit: bool


@dataclass(frozen=True)
class Commitment:
    hotkey: str
    round: int
    digest: str  # 64 lowercase hex chars (sha256 of the miner's manifest)
    block: int  # block in which it was recorded: orders who was first


@dataclass(frozen=True)
class Checkpoint:
    round: int
    digest: str  # sha256 of the merged checkpoint (protocol.identity.hashing.sha256_dir)
    uri: str
    deltas_digest: str  # sha256 of the canonical list of included deltas
    block: int
    publisher: str


@dataclass(frozen=True)
class Task:
    task_id: int
    base_hash: str
    assignment_hash: str
    data_hash: str
    uri: str


def u16_weights(uids: list[int], weights: list[float]) -> tuple[list[int], list[int]]:
    """Bittensor SDK encoding: max-upscale to u16 (w / max(w) * 65535, rounded), zeros dropped.

    Raises on negative, non-finite or duplicate entries; all-zero weights give empty lists.
    """
    import math

    if len(uids) != len(weights):
        raise ValueError(f"{len(uids)} uids but {len(weights)} weights")
    if len(set(uids)) != len(uids):
        raise ValueError("duplicate uids")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError("weights must be finite and non-negative")
    top = max(weights, default=0.0)
    if top == 0:
        return [], []
    pairs = [(u, round(w / top * U16_MAX)) for u, w in zip(uids, weights, strict=True)]
    pairs = [(u, v) for u, v in pairs if v > 0]
    return [u for u, _ in pairs], [v for _, v in pairs]


@runtime_checkable
class Chain(Protocol):
    """What every role needs from a chain. `self` acts as one key (a miner's or validator's)."""

    def block(self) -> int:
        """Current block number."""

    def block_hash(self, block: int) -> str:
        """0x-prefixed hash of a past block (the eval seed at a commit deadline)."""

    def members(self) -> list[Member]:
        """Registered neurons/addresses with uid, stake and validator permit."""

    def commit(self, round: int, digest: str) -> int:
        """Record this key's artifact digest for `round`; returns the block it landed in."""

    def commitments(self, round: int) -> list[Commitment]:
        """Every commitment recorded for `round`, with its block."""

    def set_weights(self, round: int, uids: list[int], weights: list[float]) -> int:
        """Write this validator's weights (u16 max-upscaled); returns the block."""

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        """validator uid -> {miner uid: u16 weight} as stored on chain."""

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        """Record a merged checkpoint for `round`; returns the block."""

    def checkpoints(self) -> list[Checkpoint]:
        """Every published checkpoint, oldest first."""

    def task(self) -> Task:
        """The current task rounds refer to."""
