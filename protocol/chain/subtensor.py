"""`SubtensorChain`: the Chain interface on Bittensor's native chain, through substrate-interface.

    from protocol.chain.subtensor import SubtensorChain, load_hotkey
    chain = SubtensorChain("wss://test.finney.opentensor.ai:443", netuid=42,
                           keypair=load_hotkey("validator", "default"))
    chain.commit_weights(round=3, uids=[0, 1], weights=[1.0, 0.5], salt=salt)  # evaluate phase
    chain.set_weights(round=3, uids=[0, 1], weights=[1.0, 0.5], salt=salt)     # reveal window

One object acts as one sr25519 hotkey on one netuid. How the Chain methods map:

- members(): storage `Keys`, `ValidatorPermit` and the hotkey stake (`TotalHotkeyAlpha` on
  dynamic-TAO runtimes, `TotalHotkeyStake` before), read at one block. Stake is chain units / 1e9.
- commit_weights()/set_weights(): the path the subnet's hyperparameters choose. With
  `CommitRevealWeightsEnabled`, commit-reveal v2: commit_weights sends
  `commit_weights(commit_hash(...))` (salt: the caller's salt bytes as u16 words, so a restarted
  validator that kept its salt reveals what it committed) and set_weights sends `reveal_weights`,
  which the runtime accepts only in the commit's reveal window (the epoch RevealPeriodEpochs
  after the commit's; `weight_commits` reads it). Without it, commit_weights sends nothing and
  set_weights sends `set_weights`. weight_commitment() reads storage `WeightCommits`. Subtensor
  has no rounds: `round` only narrows weight_commitment() to commits made within that round of
  the schedule (when one is given); weights hold until replaced. weights() reads storage
  `Weights` (spec 293 stores the u16 values as sent; the 2023 runtime normalised them to sum
  to about 65535); with a schedule only the rows set within that round (`rows_of_round`:
  LastUpdate and the commitments held), else all of them. Timelocked commit-reveal (crv3) is
  not implemented.
- commit()/commitments(): `Commitments.set_commitment` with a compact binary payload (format
  below) in Raw fields; commitments(round) decodes every hotkey's commitment on the netuid and
  keeps those for `round`. A hotkey holds ONE commitment per netuid: committing round r+1
  replaces round r, so validators read a round's commitments before miners move on.
- publish_checkpoint()/checkpoint()/latest_checkpoint() and publish_task()/task(): records in
  the commitment of a publisher hotkey (the subnet owner's hotkey by default). Only the latest
  checkpoint is in chain state; asking for an older one is ChainError("unsupported") (older
  ones are in archive nodes' old state).
- Runtimes without the Commitments pallet (the 2023 testnet genesis runtime) raise ChainError("unsupported", ...) for everything commitment-based.

Commitment payload, version 1 (all integers little-endian):

    payload = b"MS" | version u8 | record*            at most 3 Raw fields x 128 bytes = 384
    record  = kind u8 | body length u8 | body
    kind "c" miner commit: round u32 | digest[32]                                  (41 bytes)
    kind "k" checkpoint:   round u32 | digest[32] | deltas_digest[32] | uri utf-8
    kind "t" task:         task_id u32 | base[32] | assignment[32] | data[32] | uri utf-8

The payload is cut into Raw fields of <= 128 bytes, in order; unknown kinds are skipped so a
later version can add records. Failed extrinsics raise ChainError named after the runtime's
module error ("SettingWeightsTooFast", "NoValidatorPermit" on old runtimes,
"NeuronNoValidatorPermit" on new ones, ...). Connection errors are retried with backoff; an
extrinsic is only ever re-sent as the same signed bytes (same nonce, so it cannot land twice)
after checking the blocks since it was first sent.

Tested on chopsticks running the spec-293 subtensor runtime (July 2025;
tests/integration/test_chain_subtensor.py): members and stake, set_weights, commit-reveal v2,
Commitments, checkpoint and task records, dispatch errors. Newer mainnet runtimes (the
`*_mechanism_*` calls, `commit_timelocked_weights`) were not tested.

Length: one backend class whose nonce-safe submit, landing check and retry path is most of
it; the pure SCALE codec already lives in subtensor_codec.py, and a further split (submission
vs the Chain methods) would put one class's invariants in two files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from substrateinterface import ExtrinsicReceipt, SubstrateInterface
from substrateinterface.exceptions import SubstrateRequestException
from websocket import WebSocketException

from protocol.chain import (
    ChainError,
    Checkpoint,
    Commitment,
    DispatchError,
    Member,
    Task,
    u16_weights,
)
from protocol.chain.subtensor_codec import (  # noqa: F401  (keypair_from, load_hotkey: re-exported)
    KIND_CHECKPOINT,
    KIND_COMMIT,
    KIND_TASK,
    RAO_PER_UNIT,
    checkpoint_body,
    commit_body,
    commit_hash,
    commitment_info,
    decode_records,
    encode_records,
    epoch_index,
    keypair_from,
    load_hotkey,
    parse_checkpoint,
    parse_commit,
    parse_task,
    payload_from_info,
    reveal_window,
    salt_words,
    task_body,
)
from protocol.round.manifest import subtensor_chain
from protocol.round.schedule import PHASES, phase_bounds

if TYPE_CHECKING:
    from substrateinterface import Keypair

    from protocol.round.schedule import Schedule

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- connection


def _substrate_class():
    """SubstrateInterface whose block 0 hash comes from System.BlockHash(0).

    chopsticks answers chain_getBlockHash(0) with a placeholder in some states; the runtime's
    CheckGenesis signs against System.BlockHash(0), so use that (the same value on real nodes).
    """

    class _Substrate(SubstrateInterface):
        def get_block_hash(self, block_id: int | None = None) -> str:
            if block_id == 0:
                return self.query("System", "BlockHash", [0]).value
            return super().get_block_hash(block_id)

    return _Substrate


def _connection_errors() -> tuple[type[BaseException], ...]:
    return (OSError, WebSocketException)  # OSError covers refused, reset, timeouts


@dataclass(frozen=True)
class Landed:
    """An extrinsic that made it into a block (successfully: failures raise ChainError)."""

    block: int
    block_hash: str
    extrinsic_hash: str
    events: list[tuple[str, str, Any]]  # (pallet, event, attributes)


@dataclass(frozen=True)
class WeightCommit:
    """A commit-reveal v2 commitment held on chain (storage WeightCommits)."""

    digest: str  # the committed hash, 64 hex chars
    block: int  # the block it was committed in
    first_reveal_block: int  # its reveal window, inclusive
    last_reveal_block: int


def _has_storage(si: SubstrateInterface, pallet: str, name: str) -> bool:
    if si.metadata is None:
        si.init_runtime()
    meta = si.metadata.get_metadata_pallet(pallet)
    return meta is not None and meta.get_storage_function(name) is not None


def _as_int(value: Any) -> int:
    """An integer storage value; newer runtimes wrap balances in newtypes (e.g. AlphaCurrency)."""
    while isinstance(value, dict | list | tuple) and len(value) == 1:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return int(value or 0)


def _head(si: SubstrateInterface) -> int:
    return si.get_block_header()["header"]["number"]


def _rpc_error(exc: BaseException) -> tuple[int | None, str]:
    """(JSON-RPC error code, text) of a SubstrateRequestException from the transaction pool."""
    err = exc.args[0] if exc.args else exc
    if isinstance(err, dict):
        return err.get("code"), f"{err.get('message', '')}: {err.get('data', '')}".strip(": ")
    return None, str(err)


# Substrate transaction pool error codes (author_* RPCs) -> ChainError codes.
_POOL_CODES = {1010: "InvalidTransaction", 1011: "UnknownTransaction", 1014: "PriorityTooLow"}
# Pool answers meaning "this exact extrinsic is already known": it landed or is pending.
_ALREADY_KNOWN = ("already imported", "temporarily banned", "outdated", "stale")


def _dispatch_error(message: dict | None) -> DispatchError:
    """DispatchError named after a failed extrinsic's module error (e.g. SettingWeightsTooFast)."""
    message = message or {}
    name = message.get("name") or message.get("type") or "DispatchError"
    docs = " ".join(message.get("docs") or [])
    return DispatchError(name, f"{name}: {docs}" if docs else name)


# ---------------------------------------------------------------------------- the chain


class SubtensorChain:
    """The Chain interface on one subtensor netuid, acting as `keypair` (None: read-only).

    publisher: ss58 hotkey whose commitment carries checkpoints and the task (default: the
    subnet owner's hotkey, where the runtime records one). version_key: the weights version key
    to send (default: the subnet's current `WeightsVersionKey`). schedule: the round schedule the
    subnet's roles agree on (subtensor keeps none; schedule() refuses without it). Connection errors are retried
    `retries` times with exponential backoff from `backoff` s; `timeout` bounds each websocket
    receive and the wait for an extrinsic whose first answer was lost.
    """

    def __init__(
        self,
        url: str,
        netuid: int,
        keypair: Keypair | None = None,
        *,
        publisher: str | None = None,
        version_key: int | None = None,
        schedule: Schedule | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
    ):
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"subtensor endpoint must be a ws:// or wss:// URL, got {url!r}")
        self.url, self.netuid, self.keypair = url, int(netuid), keypair
        self.publisher, self.version_key, self._schedule = publisher, version_key, schedule
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._si: SubstrateInterface | None = None
        added = self._read(lambda si: si.query("SubtensorModule", "NetworksAdded", [self.netuid]))
        if not added.value:
            raise ValueError(f"netuid {self.netuid} does not exist on {url}")

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> SubtensorChain:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connection and retries

    def _conn(self) -> SubstrateInterface:
        if self._si is None:
            cls = _substrate_class()
            self._si = cls(url=self.url, ws_options={"timeout": self.timeout}, auto_reconnect=False)
        return self._si

    def _drop(self) -> None:
        si, self._si = self._si, None
        if si is not None:
            with contextlib.suppress(Exception):  # the socket may already be dead
                si.close()

    def _pause(self, attempt: int, exc: BaseException) -> None:
        delay = min(self.backoff * 2**attempt, 30.0)
        log.warning("subtensor %s: %s; retrying in %.1f s", self.url, exc, delay)
        time.sleep(delay)

    def _read(self, fn):
        """fn(substrate), reconnecting and retrying on connection errors only."""
        errors = _connection_errors()
        for attempt in range(self.retries + 1):
            try:
                return fn(self._conn())
            except errors as e:
                self._drop()
                if attempt == self.retries:
                    raise ChainError("Unreachable", f"{self.url}: {e}") from e
                self._pause(attempt, e)
        raise AssertionError("unreachable")

    def _storage(self, si: SubstrateInterface, name: str, params: list, default=None):
        """A SubtensorModule storage value, or `default` where this runtime lacks the item."""
        if not _has_storage(si, "SubtensorModule", name):
            return default
        return si.query("SubtensorModule", name, params).value

    def _key(self) -> Keypair:
        if self.keypair is None:
            raise ValueError("this SubtensorChain is read-only: construct it with a keypair")
        return self.keypair

    # -- identity and rounds

    def identity(self) -> str | None:
        return self.keypair.ss58_address if self.keypair is not None else None

    def label(self) -> str:
        return subtensor_chain(self.netuid)

    def schedule(self) -> Schedule:
        if self._schedule is None:
            raise ChainError(
                "unsupported", "subtensor keeps no round schedule: construct with schedule="
            )
        return self._schedule

    # -- extrinsics

    def submit(self, module: str, function: str, params: dict) -> Landed:
        """Sign module.function(params) as this hotkey, send it, wait until it is in a block.

        Raises ChainError named after the module error when it fails on chain, or after the
        pool's verdict when the node rejects it.
        """
        kp = self._key()
        ex, nonce, start = self._read(lambda si: self._sign(si, kp, module, function, params))
        return self._land(ex, nonce, start)

    def _sign(self, si: SubstrateInterface, kp: Keypair, module: str, function: str, params):
        try:
            call = si.compose_call(module, function, params)
        except ValueError as e:
            if "not found" in str(e):
                raise ChainError("unsupported", f"{module}.{function} on {self.url}: {e}") from None
            raise
        # The pool-aware next nonce: counts our own extrinsics still waiting in the pool.
        nonce = si.rpc_request("system_accountNextIndex", [kp.ss58_address])["result"]
        return si.create_signed_extrinsic(call, kp, nonce=nonce), nonce, _head(si)

    def _land(self, ex, nonce: int, start: int) -> Landed:
        """Send `ex` and wait for its block; after a lost answer, look for it before re-sending.

        Re-sending is always the same signed bytes with the same nonce, so it cannot land twice:
        first the blocks since `start` are searched, then the account nonce tells whether the
        nonce is spent by another extrinsic.
        """
        ext_hash = "0x" + ex.extrinsic_hash.hex()
        errors = _connection_errors()
        deadline = time.monotonic() + self.timeout
        sent, attempt = False, 0
        while True:
            try:
                si = self._conn()
                if sent:
                    # Nonce first, then the blocks: if ours lands in between, the scan sees it.
                    spent = si.query("System", "Account", [self._key().ss58_address]).value
                    block_hash = self._find_included(si, ext_hash, start)
                    if block_hash is not None:
                        return self._landed(si, ext_hash, block_hash)
                    if spent["nonce"] > nonce:
                        raise ChainError(
                            "NonceUsed", f"nonce {nonce} was used by another extrinsic"
                        )
                sent = True
                block_hash = self._send(si, ex)
                if block_hash is not None:
                    return self._landed(si, ext_hash, block_hash)
            except errors as e:
                self._drop()
                if attempt >= self.retries or time.monotonic() > deadline:
                    raise ChainError(
                        "Unconfirmed",
                        f"extrinsic {ext_hash} (nonce {nonce}) unconfirmed after {e}; it may "
                        "still land: check the chain before sending it again",
                    ) from e
                self._pause(attempt, e)
                attempt += 1
                continue
            if time.monotonic() > deadline:  # known to the pool but not in a block yet
                raise ChainError("Unconfirmed", f"extrinsic {ext_hash} not in a block in time")
            time.sleep(min(self.backoff, 1.0))

    def _send(self, si: SubstrateInterface, ex) -> str | None:
        """Submit and watch; the block hash, or None when the pool already knows `ex`."""
        try:
            return si.submit_extrinsic(ex, wait_for_inclusion=True).block_hash
        except SubstrateRequestException as e:
            code, text = _rpc_error(e)
            if any(k in text.lower() for k in _ALREADY_KNOWN):
                return None
            raise ChainError(
                _POOL_CODES.get(code, "Rejected"), f"node rejected it: {text}"
            ) from None
        except ValueError as e:  # the watch reported "dropped"
            raise ChainError("Dropped", str(e)) from None

    def _find_included(self, si: SubstrateInterface, ext_hash: str, start: int) -> str | None:
        """Hash of the block since `start` (at most 256 back) that includes `ext_hash`."""
        head = _head(si)
        for number in range(max(start, head - 256), head + 1):
            block_hash = si.get_block_hash(number)
            block = si.rpc_request("chain_getBlock", [block_hash])["result"]["block"]
            for raw in block["extrinsics"]:
                digest = hashlib.blake2b(bytes.fromhex(raw[2:]), digest_size=32).hexdigest()
                if "0x" + digest == ext_hash:
                    return block_hash
        return None

    def _landed(self, si: SubstrateInterface, ext_hash: str, block_hash: str) -> Landed:
        receipt = ExtrinsicReceipt(substrate=si, extrinsic_hash=ext_hash, block_hash=block_hash)
        if not receipt.is_success:
            raise _dispatch_error(receipt.error_message)
        events = [
            (e.value["module_id"], e.value["event_id"], e.value["attributes"])
            for e in receipt.triggered_events
        ]
        return Landed(si.get_block_number(block_hash), block_hash, ext_hash, events)

    # -- Chain interface: blocks and members

    def block(self) -> int:
        return self._read(_head)

    def block_hash(self, block: int) -> str:
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")
        block_hash = self._read(lambda si: si.get_block_hash(block))
        if block_hash is None:
            raise ChainError("UnknownBlock", f"block {block} not found on {self.url}")
        return block_hash

    def members(self) -> list[Member]:
        """Neurons by uid with stake (chain units / 1e9) and permit, read at one block."""
        return self._read(self._members)

    def _members(self, si: SubstrateInterface) -> list[Member]:
        at = si.get_chain_head()
        keys = {
            uid.value: hotkey.value
            for uid, hotkey in si.query_map("SubtensorModule", "Keys", [self.netuid], block_hash=at)
        }
        permits = si.query("SubtensorModule", "ValidatorPermit", [self.netuid], block_hash=at).value
        stakes = self._stakes(si, sorted(set(keys.values())), at)
        return [
            Member(uid, hotkey, stakes.get(hotkey, 0.0), bool(uid < len(permits) and permits[uid]))
            for uid, hotkey in sorted(keys.items())
        ]

    def _stakes(self, si: SubstrateInterface, hotkeys: list[str], at: str) -> dict[str, float]:
        """Stake per hotkey: on this subnet (dynamic TAO runtimes) or in total (older ones)."""
        if not hotkeys:
            return {}
        if _has_storage(si, "SubtensorModule", "TotalHotkeyAlpha"):
            params = [[hk, self.netuid] for hk in hotkeys]
            name = "TotalHotkeyAlpha"
        else:
            params, name = [[hk] for hk in hotkeys], "TotalHotkeyStake"
        keys = [si.create_storage_key("SubtensorModule", name, p) for p in params]
        values = si.query_multi(keys, block_hash=at)
        return {key.params[0]: _as_int(value.value) / RAO_PER_UNIT for key, value in values}

    def uid_of(self, hotkey: str) -> int | None:
        """The uid of an ss58 hotkey on this netuid, or None if it is not registered."""
        found = self._read(lambda si: si.query("SubtensorModule", "Uids", [self.netuid, hotkey]))
        return found.value

    def available_call(self, module: str, *names: str) -> str:
        """The first of `names` this runtime's metadata has in `module` (list the newer call
        first, e.g. "commit_timelocked_weights", "commit_crv3_weights"); ChainError
        "unsupported" when it has none of them."""

        def read(si):
            if si.metadata is None:
                si.init_runtime()
            pallet = si.metadata.get_metadata_pallet(module)
            have = {c.name for c in pallet.calls} if pallet is not None and pallet.calls else set()
            return next((n for n in names if n in have), None)

        found = self._read(read)
        if found is None:
            raise ChainError("unsupported", f"{self.url} has none of {module}.{names}")
        return found

    # -- Chain interface: weights

    def commit_reveal_enabled(self) -> bool:
        """Whether the subnet's hyperparameters ask for commit-reveal (CommitRevealWeightsEnabled)."""
        return bool(
            self._read(
                lambda si: self._storage(si, "CommitRevealWeightsEnabled", [self.netuid], False)
            )
        )

    def _version_key(self, si: SubstrateInterface) -> int:
        if self.version_key is not None:
            return self.version_key
        return self._storage(si, "WeightsVersionKey", [self.netuid], 0)

    def weight_commits(self, hotkey: str) -> list[WeightCommit]:
        """The commit-reveal v2 commitments `hotkey` holds on this netuid, oldest first."""

        def read(si):
            rows = self._storage(si, "WeightCommits", [self.netuid, hotkey]) or []
            tempo = self._storage(si, "Tempo", [self.netuid], 0)
            period = self._storage(si, "RevealPeriodEpochs", [self.netuid], 1)
            return rows, tempo, period

        rows, tempo, period = self._read(read)
        commits = []
        for row in rows:
            digest, block = str(row[0]).removeprefix("0x"), int(row[1])
            # Runtimes since 2024 store the window; compute it where only (hash, block) is kept.
            first, last = (
                (int(row[2]), int(row[3]))
                if len(row) >= 4
                else reveal_window(self.netuid, tempo, period, block)
            )
            commits.append(WeightCommit(digest, block, first, last))
        return commits

    def commit_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        """Commit-reveal v2 where the subnet enables it: `commit_weights(netuid, hash)` with the
        hash the runtime checks on reveal; returns its block. Without commit-reveal there is
        nothing to commit: no transaction, the current block is returned, and set_weights sets
        the weights directly."""
        us, ws = u16_weights(uids, weights)
        words = salt_words(salt)

        def prepare(si):
            enabled = self._storage(si, "CommitRevealWeightsEnabled", [self.netuid], False)
            return bool(enabled), self._version_key(si)

        enabled, version = self._read(prepare)
        if not enabled:
            return self.block()
        digest = commit_hash(self._key().public_key, self.netuid, us, ws, words, version)
        params = {"netuid": self.netuid, "commit_hash": "0x" + digest.hex()}
        return self.submit("SubtensorModule", "commit_weights", params).block

    def weight_commitment(self, round: int, hotkey: str) -> str | None:
        """The hash (hex) of `hotkey`'s latest commitment that can still be revealed, or None.

        Subtensor has no rounds: with a schedule, only commitments made within round `round`
        count; without one, any commitment whose reveal window has not passed."""
        head = self.block()
        live = [c for c in self.weight_commits(hotkey) if c.last_reveal_block > head]
        if self._schedule is not None:
            first = phase_bounds(self._schedule, round, PHASES[0])[0]
            last = phase_bounds(self._schedule, round, PHASES[-1])[1]
            live = [c for c in live if first <= c.block <= last]
        return live[-1].digest if live else None

    def set_weights(
        self, round: int, uids: list[int], weights: list[float], salt: bytes | None = None
    ) -> int:
        """Set the weights (u16 max-upscaled) as the subnet's hyperparameters ask; the block.

        Commit-reveal on: `reveal_weights` of what commit_weights committed with `salt` (the
        same salt bytes after a restart reveal the same commitment), accepted only inside the
        commit's reveal window (RevealTooEarly / ExpiredWeightCommit otherwise, see
        weight_commits). Off: `set_weights`. `round` is unused: weights hold until replaced.
        """
        us, ws = u16_weights(uids, weights)

        def prepare(si):
            enabled = self._storage(si, "CommitRevealWeightsEnabled", [self.netuid], False)
            return bool(enabled), self._version_key(si)

        enabled, version = self._read(prepare)
        if not enabled:
            params = {"netuid": self.netuid, "dests": us, "weights": ws, "version_key": version}
            return self.submit("SubtensorModule", "set_weights", params).block
        if salt is None:
            raise ValueError("commit-reveal is on for this subnet: set_weights needs the salt")
        params = {"netuid": self.netuid, "uids": us, "values": ws, "salt": salt_words(salt)}
        params["version_key"] = version
        return self.submit("SubtensorModule", "reveal_weights", params).block

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        """validator uid -> {uid: u16} as stored now. Subtensor keeps only each validator's
        latest weights: with a schedule, only rows set within round `round` are returned
        (rows_of_round), so a validator that set weights in an earlier round does not read as
        having set them in this one; without one, every row (`round` unused)."""

        def read(si):
            at = si.get_chain_head()
            found = si.query_map("SubtensorModule", "Weights", [self.netuid], block_hash=at)
            rows = {uid.value: dict(row.value) for uid, row in found if row.value}
            if self._schedule is None or not rows:
                return rows
            last = si.query("SubtensorModule", "LastUpdate", [self.netuid], block_hash=at).value
            keys = si.query_map("SubtensorModule", "Keys", [self.netuid], block_hash=at)
            uid_of = {hotkey.value: uid.value for uid, hotkey in keys}
            commits: dict[int, list[int]] = {}
            if _has_storage(si, "SubtensorModule", "WeightCommits"):
                held = si.query_map(
                    "SubtensorModule", "WeightCommits", [self.netuid], block_hash=at
                )
                for hotkey, pending in held:
                    if hotkey.value in uid_of:
                        commits[uid_of[hotkey.value]] = [int(c[1]) for c in pending.value or []]
            first = phase_bounds(self._schedule, round, PHASES[0])[0]
            end = phase_bounds(self._schedule, round, PHASES[-1])[1]
            return rows_of_round(rows, list(last or []), commits, (first, end))

        return self._read(read)

    # -- Chain interface: commitments, checkpoints, task

    def _require_commitments(self, si: SubstrateInterface) -> None:
        if not _has_storage(si, "Commitments", "CommitmentOf"):
            raise ChainError(
                "unsupported",
                f"the runtime at {self.url} (spec_version {si.runtime_version}) has no Commitments "
                "pallet: commitments, checkpoints and tasks need a Bittensor runtime from 2024 on",
            )

    def _records(self, si: SubstrateInterface, hotkey: str) -> tuple[dict[bytes, bytes], int]:
        """(our records, block) of a hotkey's commitment; ({}, 0) when it has none of ours."""
        self._require_commitments(si)
        reg = si.query("Commitments", "CommitmentOf", [self.netuid, hotkey]).value
        records = _decode_registration(reg)
        return (records, int(reg["block"])) if records is not None else ({}, 0)

    def _write_record(self, kind: bytes, body: bytes) -> int:
        """Replace one record in this hotkey's commitment, keeping its other records."""
        hotkey = self._key().ss58_address
        records, _ = self._read(lambda si: self._records(si, hotkey))
        payload = encode_records({**records, kind: body})
        params = {"netuid": self.netuid, "info": commitment_info(payload)}
        return self.submit("Commitments", "set_commitment", params).block

    def commit(self, round: int, digest: str) -> int:
        return self._write_record(KIND_COMMIT, commit_body(round, digest))

    def commitments(self, round: int) -> list[Commitment]:
        """Every hotkey whose current commitment is for `round`, ordered by block."""

        def read(si):
            self._require_commitments(si)
            rows = si.query_map("Commitments", "CommitmentOf", [self.netuid])
            return [(hotkey.value, reg.value) for hotkey, reg in rows]

        found = []
        for hotkey, reg in self._read(read):
            body = (_decode_registration(reg) or {}).get(KIND_COMMIT)
            decoded = parse_commit(body) if body is not None else None
            if decoded and decoded[0] == round:
                found.append(Commitment(hotkey, round, decoded[1], int(reg["block"])))
        return sorted(found, key=lambda c: (c.block, c.hotkey))

    def _publisher(self, si: SubstrateInterface) -> str:
        if self.publisher:
            return self.publisher
        owner = self._storage(si, "SubnetOwnerHotkey", [self.netuid])
        if owner:
            return owner
        raise ChainError(
            "unsupported",
            f"no publisher hotkey for netuid {self.netuid}: this runtime records no subnet owner "
            "hotkey; construct SubtensorChain with publisher=<ss58 hotkey>",
        )

    def _publisher_records(self) -> tuple[str, dict[bytes, bytes], int]:
        def read(si):
            self._require_commitments(si)
            publisher = self._publisher(si)
            return (publisher, *self._records(si, publisher))

        return self._read(read)

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        """Record a merged checkpoint in this hotkey's commitment (it must be the publisher)."""
        return self._write_record(
            KIND_CHECKPOINT, checkpoint_body(round, digest, uri, deltas_digest)
        )

    def _latest(self) -> Checkpoint | None:
        """The publisher's latest checkpoint (chain state keeps only the latest), or None."""
        publisher, records, block = self._publisher_records()
        body = records.get(KIND_CHECKPOINT)
        return parse_checkpoint(body, block, publisher) if body is not None else None

    def latest_checkpoint(self, before_round: int | None = None) -> Checkpoint | None:
        """The latest checkpoint if it is before `before_round`; an older one is not in chain
        state (ChainError "unsupported")."""
        latest = self._latest()
        if latest is None or before_round is None or latest.round < before_round:
            return latest
        raise ChainError(
            "unsupported",
            f"the latest checkpoint is of round {latest.round}; subtensor state keeps no "
            f"checkpoint before round {before_round} beside it",
        )

    def checkpoint(self, round: int) -> Checkpoint | None:
        """The checkpoint of `round` when it is the latest; None when none was published since
        (the latest is older); ChainError "unsupported" when a later one replaced it."""
        latest = self._latest()
        if latest is None or latest.round < round:
            return None
        if latest.round == round:
            return latest
        raise ChainError(
            "unsupported",
            f"round {round}'s checkpoint, if any, was replaced by round {latest.round}'s",
        )

    def publish_task(
        self,
        base_hash: str,
        assignment_hash: str,
        data_hash: str,
        uri: str,
        task_id: int | None = None,
    ) -> int:
        """Record the task in this hotkey's commitment; returns its id (default: previous + 1)."""
        if task_id is None:
            hotkey = self._key().ss58_address
            records, _ = self._read(lambda si: self._records(si, hotkey))
            previous = parse_task(records[KIND_TASK]) if KIND_TASK in records else None
            task_id = previous.task_id + 1 if previous else 0
        self._write_record(
            KIND_TASK, task_body(task_id, base_hash, assignment_hash, data_hash, uri)
        )
        return task_id

    def task(self) -> Task:
        publisher, records, _ = self._publisher_records()
        task = parse_task(records[KIND_TASK]) if KIND_TASK in records else None
        if task is None:
            raise ChainError("NoTask", f"{publisher} has published no task on netuid {self.netuid}")
        return task


def rows_of_round(
    rows: dict[int, dict[int, int]],
    last_update: list[int],
    commits: dict[int, list[int]],
    bounds: tuple[int, int],
) -> dict[int, dict[int, int]]:
    """The weight rows set within a round's blocks `bounds` (first, last, inclusive).

    rows: validator uid -> its stored weights; last_update: storage LastUpdate (block per uid);
    commits: uid -> blocks of the commit-reveal commitments its hotkey still holds. A row is
    the round's when its LastUpdate falls in the round and no commitment made in the round is
    still held: set_weights and commit_weights move LastUpdate (spec 293), reveal_weights does
    not but consumes the commitment, so a held one means the round's weights are not revealed
    (yet, or ever: it expired) and the row is an earlier round's."""
    first, last = bounds
    out = {}
    for uid, row in rows.items():
        updated = last_update[uid] if uid < len(last_update) else -1
        pending = any(first <= b <= last for b in commits.get(uid, []))
        if first <= updated <= last and not pending:
            out[uid] = row
    return out


def _decode_registration(reg: Any) -> dict[bytes, bytes] | None:
    """Our records from a CommitmentOf value, or None (absent, foreign or malformed data)."""
    if not reg:
        return None
    try:
        return decode_records(payload_from_info(reg["info"]))
    except (ValueError, KeyError, TypeError):  # anyone may commit anything: skip what's not ours
        return None
