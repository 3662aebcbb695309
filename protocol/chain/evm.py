"""`EvmChain`: the Chain interface over the MoesaicRegistry contract on any EVM JSON-RPC node.

    from protocol.chain.evm import EvmChain, load_account
    chain = EvmChain("http://127.0.0.1:8545", registry_address, load_account(key="0x..."))
    chain.commit(round=3, digest="ab" * 32)

Transactions are signed locally with an eth-account key (keystore JSON or raw hex) and sent
raw, so no node needs to hold or unlock keys. A revert comes back as `ChainError(code, msg)`
whose code is the contract's custom error name ("WrongPhase", "AlreadyCommitted", ...).
The ABI and bytecode come from the committed artifact contracts/build/MoesaicRegistry.json
(scripts/compile_contracts.py), so neither node nor solc is needed at run time.

Reads are bounded: members, a round's commitments and its weight sets are read page by page
(the contract's MAX_PAGE and MAX_WEIGHT_SETS_PAGE), every page at one block so the pages agree,
and checkpoints one at a time by round (`checkpoint`, `latest_checkpoint`); no call the roles
make costs more gas as members or checkpoints accumulate (tests/integration/test_chain_gas.py).
Weights are committed (`commit_weights`: keccak256 of abi.encode(round, sender, uids, values,
salt), as the contract's `weightsHash`) and then revealed (`set_weights`).

Faults: connection errors, timeouts and HTTP 5xx/429 answers are retried `retries` times with
exponential backoff from `backoff` s (capped at 30 s), each retry logged as a warning; then
ChainError("Unreachable") for reads. A transaction is signed ONCE (one nonce) and only ever
re-sent as those same raw bytes, so the node dedupes it and it cannot land twice. Before a
re-send the transaction hash is looked up (receipt, then the pool), and a "nonce too low" /
"already known" answer is resolved the same way: our hash is known -> wait for its receipt;
unknown -> ChainError("NonceUsed"), another transaction took the nonce. When the answers stay
lost, ChainError("Unconfirmed") says the transaction may still land. Nothing else escapes as
a web3 or decoding exception: any other failure of a call comes out as a ChainError too,
"OutOfGas" (a read past the node's or `call_gas`'s cap), "BadResponse" (an answer that is
not what JSON-RPC promises) or "RpcError" (an error answer), so a role daemon can react to it
(protocol.round.runtime.after_failure).

Length: one backend class whose nonce-safe send-and-retry path is about a third of it; it is
kept beside the Chain methods it serves (as in subtensor.py) because every method is a thin
call into it and reading them apart would hide how a transaction lands exactly once.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import time
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from eth_abi import decode, encode
from eth_account import Account
from eth_utils import keccak
from web3 import Web3
from web3.exceptions import BlockNotFound, ContractLogicError, TransactionNotFound, Web3RPCError
from web3.middleware import ExtraDataToPOAMiddleware

from protocol.chain import ChainError, Checkpoint, Commitment, Member, Task, u16_weights
from protocol.round.manifest import evm_chain
from protocol.round.schedule import PHASES, Schedule

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

BUILD = Path(__file__).resolve().parents[2] / "contracts" / "build"
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Head room over the node's gas estimate: paths that depend on block.number or storage written
# by another transaction in the same block may cost slightly more than the estimate.
_GAS_NUM, _GAS_DEN, _GAS_EXTRA = 6, 5, 20_000
RETRIES, BACKOFF, MAX_PAUSE = 4, 0.5, 30.0  # attempts after the first; first pause (s); cap
_POLL = 0.1  # s between receipt polls
# Entries per page read: the contract's MAX_PAGE (members, commitments), MAX_WEIGHT_SETS_PAGE
# and MAX_WEIGHTS. tests/integration/test_chain_gas.py measures a full page under CALL_GAS.
PAGE, WEIGHT_SETS_PAGE, MAX_WEIGHTS = 256, 4, 512
CALL_GAS = 10_000_000  # gas cap of every eth_call: a read past it is ChainError("OutOfGas")
# Lower-case fragments of node answers to eth_sendRawTransaction meaning "a transaction with
# this nonce is already in the pool or a block": ours after a lost answer, or another one.
# geth: "already known", "nonce too low", "replacement transaction underpriced"; anvil:
# "transaction already imported", "nonce too low"; nethermind: "AlreadyKnown", "OldNonce";
# erigon: "ALREADY_EXISTS".
_SEEN = (
    "already known",
    "already imported",
    "alreadyknown",
    "already_exists",
    "already exists",
    "known transaction",
    "nonce too low",
    "nonce is too low",
    "oldnonce",
    "underpriced",
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- artifact, errors


@cache
def artifact(name: str = "MoesaicRegistry") -> dict:
    """A contract's committed compiler output: abi, bytecode, deployedBytecode, compiler, ..."""
    path = BUILD / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run scripts/compile_contracts.py")
    return json.loads(path.read_text())


@cache
def _error_table() -> dict[bytes, tuple[str, list[str], list[str]]]:
    """4-byte selector -> (error name, argument names, argument types), from every compiled
    contract's ABI (our registry, and the stand-ins tests place at precompile addresses)."""
    table = {}
    abis = [artifact(p.stem)["abi"] for p in sorted(BUILD.glob("*.json"))]
    for item in (i for abi in abis for i in abi):
        if item["type"] == "error":
            types = [i["type"] for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            table[keccak(text=sig)[:4]] = (item["name"], [i["name"] for i in item["inputs"]], types)
    # Solidity's built-ins: Error(string) from require/revert strings, Panic(uint256) from
    # assert, overflow and out-of-bounds access.
    table[keccak(text="Error(string)")[:4]] = ("Error", ["message"], ["string"])
    table[keccak(text="Panic(uint256)")[:4]] = ("Panic", ["code"], ["uint256"])
    return table


def decode_revert(data: bytes) -> ChainError:
    """A ChainError named after the custom error encoded in revert `data`."""
    data = bytes(data)
    entry = _error_table().get(data[:4])
    if entry is None:
        return ChainError("Reverted", f"unknown revert data 0x{data.hex()}")
    name, names, types = entry
    try:
        values = decode(types, data[4:])
    except Exception:  # malformed arguments: still report which error it was
        return ChainError(name, f"{name} with undecodable data 0x{data.hex()}")
    args = ", ".join(f"{n}={_show(n, v)}" for n, v in zip(names, values, strict=True))
    return ChainError(name, f"{name}({args})")


# WrongPhase's phase arguments are indices into PHASES (255: the first round has not started).
_PHASE_ARGS = ("expected", "currentPhase")


def _show(name: str, value: Any) -> str:
    if name in _PHASE_ARGS and isinstance(value, int):
        return PHASES[value] if value < len(PHASES) else "not-started"
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def _revert_data(exc: BaseException) -> bytes | None:
    """Raw revert data carried by an exception from web3 or eth-tester, if any."""
    data = getattr(exc, "data", None)
    if isinstance(data, str) and data.startswith("0x") and len(data) >= 10:
        return bytes.fromhex(data[2:])
    # eth-tester (in-process py-evm) raises TransactionFailed("execution reverted: b'...'")
    # with the raw bytes' repr in the message instead of a hex `data` field.
    m = re.search(r"execution reverted: (b'.*'|b\".*\")\s*$", str(exc), re.S)
    if m:
        return ast.literal_eval(m.group(1))
    return None


def _as_chain_error(exc: BaseException) -> ChainError | None:
    """The ChainError for a revert, or None when `exc` is not a revert (network, RPC support)."""
    data = _revert_data(exc)
    if data:
        return decode_revert(data)
    text = str(exc).lower()
    # anvil: "execution reverted: Out of gas: ..." (estimates), "EVM error OutOfGas" (calls)
    if any(k in text for k in ("out of gas", "outofgas", "gas required exceeds")):
        return ChainError("OutOfGas", str(exc))
    if isinstance(exc, ContractLogicError) or "revert" in text:
        return ChainError("Reverted", str(exc))
    return None


def as_chain_error(exc: BaseException, what: str) -> ChainError:
    """Any failure of a chain request as a ChainError with a code a caller can act on.

    A revert keeps the contract's error name; "OutOfGas" when the node ran out of gas for
    it; "RpcError" for another error answer from the node; "BadResponse" for everything
    else (an answer web3 could not parse or decode: a broken or hostile endpoint).
    """
    if isinstance(exc, ChainError):
        return exc
    err = _as_chain_error(exc)
    if err is not None:
        return err
    text = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, Web3RPCError):
        return ChainError("RpcError", text)
    return ChainError("BadResponse", text)


# ---------------------------------------------------------------------------- keys, values


def load_account(
    key: str | None = None, keystore: str | Path | None = None, password: str | None = None
) -> LocalAccount:
    """An eth-account key from a raw hex private key OR a keystore JSON file and its password."""
    if (key is None) == (keystore is None):
        raise ValueError("give exactly one of a raw hex key or a keystore file")
    if key is not None:
        try:
            return Account.from_key(key.strip())
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a 32-byte hex private key: {e}") from None
    if password is None:
        raise ValueError("a keystore file needs its password")
    doc = json.loads(Path(keystore).read_text())
    try:
        return Account.from_key(Account.decrypt(doc, password))
    except ValueError as e:
        raise ValueError(f"cannot decrypt keystore {keystore}: {e}") from None


def to_bytes32(digest: str) -> bytes:
    """64 lowercase hex chars (the Python types' digest format) -> bytes32."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"digest must be 64 lowercase hex characters, got {digest!r}")
    return bytes.fromhex(digest)


def connect(url: str, timeout: float = 30.0) -> Web3:
    """A Web3 over HTTP JSON-RPC; tolerates proof-of-authority chains' long extraData."""
    # exception_retry_configuration=None: web3's own silent retries (which include
    # eth_sendRawTransaction) would sit under ours; EvmChain and send() retry, logged, once.
    provider = Web3.HTTPProvider(
        url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
    )
    w3 = Web3(provider)
    w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
    return w3


# ---------------------------------------------------------------------------- faults, retries


def transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure to reach the node (worth retrying), not an answer from it.

    requests' ConnectionError, Timeout and HTTPError are OSErrors; an HTTP error is transient
    only for 5xx (a proxy's 502/503/504) and 429 (rate limited): a 401 or 404 will not heal.
    """
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status == 429
    return isinstance(exc, OSError)


def _pause(attempt: int, backoff: float, what: str, exc: BaseException) -> None:
    delay = min(backoff * 2**attempt, MAX_PAUSE)
    log.warning(
        "evm %s: %s: %s; retry %d in %.2f s", what, type(exc).__name__, exc, attempt + 1, delay
    )
    time.sleep(delay)


def retrying(fn, what: str, retries: int = RETRIES, backoff: float = BACKOFF):
    """fn(), retried on transient errors only; ChainError("Unreachable") once they run out.

    Only for requests that are safe to repeat (reads, estimates); sends go through _land.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            if attempt == retries:
                raise ChainError("Unreachable", f"{what}: {e}") from e
            _pause(attempt, backoff, what, e)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------- transactions


def _estimate(fn, tx: dict) -> int:
    """Gas for `fn` as it would run in the next block, or the decoded revert as ChainError.

    Estimating at "pending" makes block.number the one the transaction lands in, which the
    phase checks depend on. Nodes without a pending estimate (eth-tester) already use the
    next block for "latest", so fall back to it. A lost request is not "no pending support":
    it propagates for the caller's retry instead of silently estimating at "latest".
    """
    last: Exception | None = None
    for block in ("pending", None):  # None: the node's default, "latest"
        try:
            return fn.estimate_gas(tx, block_identifier=block)
        except Exception as e:
            if transient(e):
                raise
            err = _as_chain_error(e)
            if err is not None:
                raise err from None
            last = e
    if isinstance(last, Web3RPCError):  # e.g. insufficient funds for gas
        raise ChainError("Rejected", str(last)) from None
    raise last


def send(
    w3: Web3,
    account: LocalAccount,
    fn,
    value: int = 0,
    timeout: float = 120.0,
    *,
    retries: int = RETRIES,
    backoff: float = BACKOFF,
) -> Any:
    """Sign `fn` (a contract function or constructor call) locally, send it, return the receipt.

    Raises ChainError with the contract's error name when it reverts, before or after sending.
    The transaction is signed once; lost requests and answers are retried (module doc) without
    ever signing a second transaction, so one call spends exactly one nonce. `timeout` bounds
    the wait for the receipt.
    """
    read = lambda f, what: retrying(f, what, retries, backoff)  # noqa: E731
    base = {"from": account.address, "value": value}
    gas = read(lambda: _estimate(fn, base), "estimate gas") * _GAS_NUM // _GAS_DEN + _GAS_EXTRA
    nonce = read(lambda: w3.eth.get_transaction_count(account.address, "pending"), "nonce")
    chain_id = read(lambda: w3.eth.chain_id, "chain id")
    # build_transaction asks the node for fee parameters: a read like the others.
    tx = read(
        lambda: fn.build_transaction({**base, "gas": gas, "nonce": nonce, "chainId": chain_id}),
        "build transaction",
    )
    signed = account.sign_transaction(tx)
    receipt = _land(w3, signed, nonce, account.address, timeout, retries, backoff)
    if receipt["status"] != 1:
        raise read(lambda: _explain_failure(w3, tx, receipt["blockNumber"]), "explain revert")
    return receipt


def _land(w3: Web3, signed, nonce: int, sender: str, timeout: float, retries: int, backoff: float):
    """Send `signed` and wait for its receipt; after a lost answer look it up before re-sending.

    Every (re-)send is the same raw bytes, hence the same hash and nonce: a node that already
    has it answers "already known" / "nonce too low" (resolved in _submit) instead of running
    it twice. `retries` bounds consecutive transient failures, `timeout` the whole wait.
    """
    tx_hash = signed.hash
    what = f"transaction {tx_hash.to_0x_hex()} (nonce {nonce} of {sender})"
    deadline = time.monotonic() + timeout
    sent, failures = False, 0
    while True:
        try:
            resend = False
            if sent:
                try:
                    return w3.eth.get_transaction_receipt(tx_hash)
                except TransactionNotFound:
                    resend = not _in_node(w3, tx_hash)  # neither mined nor pending: lost
            if not sent or resend:
                if resend:
                    log.warning("evm %s: not known to the node; re-sending the same bytes", what)
                sent = True  # before the call: a request whose answer is lost may have landed
                _submit(w3, signed.raw_transaction, tx_hash, nonce, sender)
                failures = 0
                continue  # look for the receipt at once (automining nodes have it already)
            failures = 0
        except Exception as e:
            if not transient(e):
                raise
            failures += 1
            if failures > retries or time.monotonic() > deadline:
                raise ChainError(
                    "Unconfirmed",
                    f"{what} unconfirmed after {e}; it may still land: check the chain (its "
                    "receipt, or the sender's nonce) before sending it again",
                ) from e
            _pause(failures - 1, backoff, what, e)
            continue
        if time.monotonic() > deadline:
            raise ChainError("Unconfirmed", f"{what} not mined within {timeout} s")
        time.sleep(_POLL)


def _submit(w3: Web3, raw: bytes, tx_hash: bytes, nonce: int, sender: str) -> None:
    """eth_sendRawTransaction; an answer saying the nonce is taken is fine when it is ours."""
    try:
        w3.eth.send_raw_transaction(raw)
    except Web3RPCError as e:
        text = str(e)
        if not any(k in text.lower() for k in _SEEN):
            raise ChainError("Rejected", text) from None
        if _in_node(w3, tx_hash):  # our own bytes, sent before an answer got lost
            log.info("evm: node already has %s (%s)", tx_hash.to_0x_hex(), text)
            return
        raise ChainError(
            "NonceUsed", f"nonce {nonce} of {sender} was taken by another transaction: {text}"
        ) from None


def _in_node(w3: Web3, tx_hash: bytes) -> bool:
    """Whether the node knows the transaction (pending in its pool or mined)."""
    try:
        w3.eth.get_transaction(tx_hash)
        return True
    except TransactionNotFound:
        return False


def _explain_failure(w3: Web3, tx: dict, block: int) -> ChainError:
    """Replays a transaction that reverted on chain (it passed estimation) to name the error."""
    call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
    try:
        w3.eth.call(call, block)
    except Exception as e:
        if transient(e):
            raise  # for send()'s retry, not reported as an unexplained revert
        err = _as_chain_error(e)
        if err is not None:
            return err
    return ChainError("Reverted", f"transaction reverted in block {block}")


def deploy_registry(w3: Web3, account: LocalAccount, schedule: Schedule, bond: int = 0) -> str:
    """Deploy MoesaicRegistry with `schedule` and minimum bond `bond` wei; returns its address."""
    art = artifact()
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    ctor = factory.constructor(schedule.start_block, list(schedule.lengths), int(bond))
    receipt = send(w3, account, ctor)
    return receipt["contractAddress"]


# ---------------------------------------------------------------------------- the chain


class EvmChain:
    """The Chain interface on a MoesaicRegistry; `account` signs (None: read-only).

    `timeout` bounds the wait for each transaction's receipt; `retries` and `backoff` set the
    retry policy for lost or failed requests (module doc); `call_gas` caps every read.
    """

    def __init__(
        self,
        w3: Web3 | str,
        registry: str,
        account: LocalAccount | None = None,
        *,
        timeout: float = 120.0,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        call_gas: int = CALL_GAS,
    ):
        self.call_gas = call_gas
        self.w3 = connect(w3) if isinstance(w3, str) else w3
        self.registry = Web3.to_checksum_address(registry)
        self.retries, self.backoff = retries, backoff
        code = self._read(lambda: self.w3.eth.get_code(self.registry), "get code")
        if len(code) == 0:
            raise ValueError(f"no contract at {self.registry}: wrong --registry or chain?")
        self.contract = self.w3.eth.contract(address=self.registry, abi=artifact()["abi"])
        self.account = account
        self.timeout = timeout
        self._chain_id: int | None = None

    @property
    def address(self) -> str | None:
        """The address this client signs as (None when read-only)."""
        return self.account.address if self.account is not None else None

    def identity(self) -> str | None:
        return self.address

    def chain_id(self) -> int:
        """The node's EIP-155 chain id (read once: it never changes under a client)."""
        if self._chain_id is None:
            self._chain_id = int(self._read(lambda: self.w3.eth.chain_id, "chain id"))
        return self._chain_id

    def label(self) -> str:
        return evm_chain(self.chain_id(), self.registry)

    def _fn(self):
        return self.contract.functions

    def _send(self, fn, value: int = 0) -> int:
        """Send as this key; returns the block the transaction landed in."""
        return self._send_receipt(fn, value)["blockNumber"]

    def _send_receipt(self, fn, value: int = 0):
        if self.account is None:
            raise ValueError("this EvmChain is read-only: construct it with an account")
        try:
            return send(
                self.w3,
                self.account,
                fn,
                value,
                self.timeout,
                retries=self.retries,
                backoff=self.backoff,
            )
        except Exception as e:
            raise as_chain_error(e, f"send {fn.fn_name}") from e

    def _read(self, fn, what: str):
        try:
            return retrying(fn, what, self.retries, self.backoff)
        except Exception as e:
            raise as_chain_error(e, what) from e

    def _call(self, fn, block: int | str = "latest"):
        tx = {"gas": self.call_gas}
        return self._read(lambda: fn.call(tx, block_identifier=block), f"call {fn.fn_name}")

    def _pages(self, page, count: int, size: int, block: int) -> list:
        """Every row of a paged view: page(start, size) for start in 0, size, ... < count,
        all at `block` so that the pages agree with each other."""
        rows: list = []
        for start in range(0, count, size):
            rows += self._call(page(start, size), block)
        return rows

    # -- Chain interface

    def block(self) -> int:
        number = self._read(lambda: self.w3.eth.block_number, "block number")
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ChainError("BadResponse", f"block number: not a block number: {number!r:.100}")
        return number

    def block_hash(self, block: int) -> str:
        def get():
            try:
                return self.w3.eth.get_block(block)["hash"].to_0x_hex()
            except BlockNotFound:
                raise ChainError("UnknownBlock", f"block {block} not found") from None

        return self._read(get, f"block {block}")

    def members(self) -> list[Member]:
        at = self.block()
        count = self._call(self._fn().memberCount(), at)
        rows = self._pages(self._fn().membersPage, count, PAGE, at)
        return [
            Member(uid, account, float(Web3.from_wei(bond, "ether")), validator)
            for uid, account, bond, _miner, validator in rows
        ]

    def commit(self, round: int, digest: str) -> int:
        return self._send(self._fn().commit(round, to_bytes32(digest)))

    def commitments(self, round: int) -> list[Commitment]:
        at = self.block()
        count = self._call(self._fn().commitmentCount(round), at)
        page = lambda start, size: self._fn().commitmentsPage(round, start, size)  # noqa: E731
        rows = self._pages(page, count, PAGE, at)
        return [Commitment(miner, round, d.hex(), blk) for miner, _uid, blk, d in rows]

    def commit_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        us, ws = capped_u16_weights(uids, weights)
        digest = weights_hash(round, self._sender(), us, ws, salt)
        return self._send(self._fn().commitWeights(round, digest))

    def weight_commitment(self, round: int, hotkey: str) -> str | None:
        held = self._call(self._fn().weightCommitment(round, Web3.to_checksum_address(hotkey)))
        return None if held == bytes(32) else held.hex()

    def set_weights(self, round: int, uids: list[int], weights: list[float], salt: bytes) -> int:
        us, ws = capped_u16_weights(uids, weights)
        return self._send(self._fn().setWeights(round, us, ws, _salt(salt)))

    def weights(self, round: int) -> dict[int, dict[int, int]]:
        at = self.block()
        count = self._call(self._fn().weightSetCount(round), at)
        page = lambda start, size: self._fn().weightsPage(round, start, size)  # noqa: E731
        rows = self._pages(page, count, WEIGHT_SETS_PAGE, at)
        return {vuid: dict(zip(us, ws, strict=True)) for vuid, _v, _b, us, ws in rows}

    def publish_checkpoint(self, round: int, digest: str, uri: str, deltas_digest: str) -> int:
        fn = self._fn().publishCheckpoint(round, to_bytes32(digest), uri, to_bytes32(deltas_digest))
        return self._send(fn)

    def checkpoint(self, round: int) -> Checkpoint | None:
        return _checkpoint(*self._call(self._fn().checkpointOf(round)))

    def latest_checkpoint(self, before_round: int | None = None) -> Checkpoint | None:
        if before_round is None:
            return _checkpoint(*self._call(self._fn().latestCheckpoint()))
        return _checkpoint(*self._call(self._fn().latestCheckpointBefore(before_round)))

    def _sender(self) -> str:
        if self.account is None:
            raise ValueError("this EvmChain is read-only: construct it with an account")
        return self.account.address

    def task(self) -> Task:
        task_id, (base, assignment, data, uri, _blk) = self._call(self._fn().currentTask())
        return Task(task_id, base.hex(), assignment.hex(), data.hex(), uri)

    # -- schedule

    def schedule(self) -> Schedule:
        start, lengths = self._call(self._fn().schedule())
        return Schedule(start, *lengths)

    def position(self, block: int) -> tuple[int, str, int, int] | None:
        """(round, phase name, first, last block) of `block` as the contract computes it."""
        started, rnd, phase, first, last = self._call(self._fn().position(block))
        return (rnd, PHASES[phase], first, last) if started else None

    # -- members and roles (register/deregister: any key; the rest: owner only)

    def owner(self) -> str:
        return self._call(self._fn().owner())

    def min_bond(self) -> int:
        return self._call(self._fn().minBond())

    def register(self, bond: int | None = None) -> int:
        """Register this key as a miner with `bond` wei (default: the minimum); returns the uid."""
        value = self.min_bond() if bond is None else int(bond)
        receipt = self._send_receipt(self._fn().register(), value)
        (event,) = self.contract.events.Registered().process_receipt(receipt)
        return event["args"]["uid"]

    def deregister(self) -> int:
        return self._send(self._fn().deregister())

    def uid_of(self, address: str) -> int | None:
        found, uid = self._call(self._fn().uidOf(address))
        return uid if found else None

    def authorise_validator(self, address: str, allowed: bool = True) -> int:
        return self._send(self._fn().setValidator(address, allowed))

    def set_merger(self, address: str, allowed: bool = True) -> int:
        return self._send(self._fn().setMerger(address, allowed))

    def set_min_bond(self, wei: int) -> int:
        return self._send(self._fn().setMinBond(int(wei)))

    def transfer_ownership(self, address: str) -> int:
        return self._send(self._fn().transferOwnership(address))

    def publish_task(self, base_hash: str, assignment_hash: str, data_hash: str, uri: str) -> int:
        """Publish the task rounds refer to from now on; returns its id."""
        hashes = [to_bytes32(h) for h in (base_hash, assignment_hash, data_hash)]
        receipt = self._send_receipt(self._fn().publishTask(*hashes, uri))
        (event,) = self.contract.events.TaskPublished().process_receipt(receipt)
        return event["args"]["taskId"]


# ---------------------------------------------------------------------------- weights, checkpoints


def capped_u16_weights(uids: list[int], weights: list[float]) -> tuple[list[int], list[int]]:
    """u16_weights, keeping the MAX_WEIGHTS largest (ties: the lower uid) in uid order: the
    contract refuses longer vectors, and both commit and reveal must send the same one."""
    us, ws = u16_weights(uids, weights)
    if len(us) <= MAX_WEIGHTS:
        return us, ws
    kept = sorted(sorted(zip(us, ws, strict=True), key=lambda p: (-p[1], p[0]))[:MAX_WEIGHTS])
    return [u for u, _ in kept], [w for _, w in kept]


def _salt(salt: bytes) -> bytes:
    if not isinstance(salt, bytes | bytearray) or len(salt) != 32:
        raise ValueError("the weights salt must be 32 bytes")
    return bytes(salt)


def weights_hash(
    round: int, validator: str, uids: list[int], values: list[int], salt: bytes
) -> bytes:
    """The contract's weightsHash: keccak256(abi.encode(round, validator, uids, values, salt))."""
    types = ["uint256", "address", "uint16[]", "uint16[]", "bytes32"]
    return keccak(encode(types, [round, validator, list(uids), list(values), _salt(salt)]))


def _checkpoint(found: bool, row) -> Checkpoint | None:
    if not found:
        return None
    rnd, digest, uri, deltas_digest, block, publisher = row
    return Checkpoint(rnd, digest.hex(), uri, deltas_digest.hex(), block, publisher)
