"""One chain interface for every role, with real backends.

Backends: `evm` (our registry contract on any EVM chain, including Bittensor EVM),
`subtensor` (Bittensor's native chain through substrate-interface), `subtensor-evm` (weights
through the Bittensor neuron precompile), and `fake` (in-memory, unit tests only; the
conformance suite runs the same cases on it and on the real backends).

Roles reach a chain only through `Chain`; `open_chain` (with `chain_signer` for the key) is the
one place that picks and builds a backend from the [chain] config, as `open_store` does for
stores. Everything here is plain data; a backend (and a wallet key source) is imported only
when it is opened, so its heavy libraries stay out of this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from protocol.config import CHAIN_KINDS as _CONFIG_KINDS
from protocol.identity.keyfile import read_private
from protocol.identity.keys import EthSigner, Sr25519Signer, load_signer

if TYPE_CHECKING:
    from protocol.config import ChainConfig
    from protocol.identity.keys import Signer
    from protocol.round.schedule import Schedule

U16_MAX = 65535


class ChainError(RuntimeError):
    """A chain call failed for a reason the caller should see (reverted, rate-limited, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DispatchError(ChainError):
    """A transaction the chain's runtime executed and refused, named after its module error
    (subtensor: SettingWeightsTooFast, NeuronNoValidatorPermit, RevealTooEarly, ...): the node
    is fine, the call is refused now. A daemon survives it (protocol.round.runtime)."""


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

    def commit_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        """Commit a hash of this validator's weights for `round` (in its evaluate phase); the
        backend computes the hash its own way. Returns the block."""

    def weight_commitment(self, round: int, hotkey: str) -> str | None:
        """The weights hash `hotkey` committed for `round` (hex), or None: lets a restarted
        validator see that its commitment already landed."""

    def set_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        """Reveal this validator's weights (u16 max-upscaled) and the salt of its commitment
        (in the weights phase); refused unless they match that commitment. Returns the block."""

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        """validator uid -> {miner uid: u16 weight} as stored on chain."""

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        """Record a merged checkpoint for `round` (in its merge phase); returns the block."""

    def checkpoint(self, round: int) -> Checkpoint | None:
        """The checkpoint published for `round`, or None."""

    def latest_checkpoint(self, before_round: int | None = None) -> Checkpoint | None:
        """The checkpoint of the latest round before `before_round` (None: of any round) that
        has one, or None. Bounded: no backend reads every checkpoint ever published."""

    def task(self) -> Task:
        """The current task rounds refer to."""

    def schedule(self) -> Schedule:
        """The round schedule (start block, phase lengths) every role on this chain follows."""

    def label(self) -> str:
        """The deployment manifests are signed for (protocol.round.manifest.evm_chain or
        subtensor_chain): a manifest made for one chain or registry is refused on another."""

    def identity(self) -> str | None:
        """The key this client sends as (0x address or ss58); None when it is read-only."""


def recent_checkpoints(chain: Chain, last: int) -> list[Checkpoint]:
    """The `last` latest checkpoints, oldest first: one bounded read each, never the whole
    history at once (it grows by one checkpoint a round)."""
    found: list[Checkpoint] = []
    before = None
    while len(found) < last:
        c = chain.latest_checkpoint(before_round=before)
        if c is None:
            break
        found.append(c)
        before = c.round
    return found[::-1]


# The kinds open_chain builds; [chain] (protocol.config) refuses the others at load time.
CHAIN_KINDS = _CONFIG_KINDS


def chain_signer(config: ChainConfig) -> Signer | None:
    """The key [chain] names, as a Signer: key_file (0x hex, or sr25519:<secret>), keystore
    (decrypted with its password) or a Bittensor wallet's hotkey; None when none is set (a
    read-only client). Errors name the file, never its contents."""
    if config.keystore:
        from protocol.identity.wallet import load_keystore  # noqa: PLC0415 (key source chosen at run time; wallet.py loads substrate-interface and eth-account)

        account = load_keystore(
            config.keystore,
            password_env=config.keystore_password_env,
            password_file=config.keystore_password_file,
        )
        return EthSigner(account.key)
    if config.wallet_name:
        from protocol.identity.wallet import Wallet, load_hotkey  # noqa: PLC0415 (key source chosen at run time; wallet.py loads substrate-interface and eth-account)

        return Sr25519Signer(
            load_hotkey(Wallet(config.wallet_name, config.wallet_hotkey, config.wallet_path))
        )
    if not config.key_file:
        return None
    text = read_private(config.key_file).strip()  # refused when other users may read it
    if not text:
        raise ValueError(f"key file {config.key_file} is empty")
    try:
        return load_signer(text)
    except ValueError:
        # Never echo the parse error: it may quote the key.
        raise ValueError(
            f"{config.key_file}: not a recognised key (0x + 64 hex, or sr25519:<secret>)"
        ) from None


def open_chain(config: ChainConfig, signer: Signer | None = None) -> Chain:
    """The chain client [chain] describes, sending as `signer` (None: read-only).

    kind "evm": our registry contract over JSON-RPC at `rpc`; an Ethereum key sends, and a set
    `chain_id` must be the node's. kind "subtensor": the subnet `netuid` through the subtensor
    node at `rpc` (ws/wss), an sr25519 key (a Bittensor hotkey) sends, rounds follow
    [chain.schedule]. "subtensor-evm" is refused by [chain] itself (not there yet).
    """
    if config.kind not in CHAIN_KINDS:
        raise ValueError(f"chain kind {config.kind!r} unknown; one of {CHAIN_KINDS}")
    if config.kind == "subtensor":
        return _open_subtensor(config, signer)
    from protocol.chain.evm import EvmChain  # noqa: PLC0415 (import cycle: evm.py imports this package)

    account = None
    if signer is not None:
        account = getattr(signer, "account", None)
        if account is None:
            raise ValueError(
                f"chain kind 'evm' sends with an Ethereum key; {signer.identity} is not one"
            )
    chain = EvmChain(config.rpc, config.registry, account)
    if config.chain_id is not None and config.chain_id != chain.chain_id():
        raise ValueError(
            f"[chain] chain_id is {config.chain_id} but the node at rpc reports {chain.chain_id()}"
        )
    return chain


def _open_subtensor(config: ChainConfig, signer: Signer | None) -> Chain:
    """SubtensorChain on [chain] netuid, signing with the signer's sr25519 keypair."""
    from protocol.chain.subtensor import SubtensorChain  # noqa: PLC0415 (import cycle: subtensor.py imports this package; substrate-interface is heavy)
    from protocol.round.schedule import Schedule  # noqa: PLC0415 (only a subtensor chain needs one from config)

    keypair = None
    if signer is not None:
        keypair = getattr(signer, "keypair", None)
        if keypair is None:
            raise ValueError(
                f"chain kind 'subtensor' sends with an sr25519 key (a Bittensor hotkey, or "
                f"key_file sr25519:<secret>); {signer.identity} is not one"
            )
    if config.netuid is None or config.schedule is None:  # [chain] refuses this at load time
        raise ValueError("[chain] kind 'subtensor' needs netuid and [chain.schedule]")
    schedule = Schedule(**asdict(config.schedule))  # the same fields, validated the same way
    return SubtensorChain(
        config.rpc, config.netuid, keypair, publisher=config.publisher or None, schedule=schedule
    )
