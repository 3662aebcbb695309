"""Pure encodings for the subtensor backend, and hotkey loading; no network, no chain.

- commit-reveal weights: `commit_hash` is blake2b-256 over
  pubkey(32) | u16 LE netuid | SCALE Vec<u16> uids | Vec<u16> values | Vec<u16> salt | u64 LE version_key
- our commitment payload in `Commitments` Raw fields (format in protocol.chain.subtensor's docstring)
- standard Bittensor wallet hotkey files (~/.bittensor/wallets/NAME/hotkeys/HOTKEY)
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

from substrateinterface import Keypair

from protocol.chain import Checkpoint, Task
from protocol.identity.keyfile import read_private

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
MAGIC = b"MS"
PAYLOAD_VERSION = 1
RAW_FIELD_BYTES = 128  # Commitments `Data::Raw` holds at most 128 bytes
MAX_FIELDS = 3  # Commitments MaxFields on Bittensor runtimes
MAX_PAYLOAD_BYTES = RAW_FIELD_BYTES * MAX_FIELDS
KIND_COMMIT, KIND_CHECKPOINT, KIND_TASK = b"c", b"k", b"t"
MAX_SALT_BYTES = 64  # the validator draws 32; a bound keeps reveal extrinsics small
RAO_PER_UNIT = 1e9
_DIGEST = re.compile(r"[0-9a-f]{64}")
_U32 = struct.Struct("<I")


# ---------------------------------------------------------------------------- pure encodings


def scale_compact(n: int) -> bytes:
    """SCALE compact encoding of a non-negative integer below 2**30 (vector lengths)."""
    if n < 0 or n >= 1 << 30:
        raise ValueError(f"compact length out of range: {n}")
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return struct.pack("<H", (n << 2) | 1)
    return struct.pack("<I", (n << 2) | 2)


def scale_vec_u16(values: list[int]) -> bytes:
    return scale_compact(len(values)) + b"".join(struct.pack("<H", v) for v in values)


def commit_hash(
    pubkey: bytes,
    netuid: int,
    uids: list[int],
    values: list[int],
    salt: list[int],
    version_key: int,
) -> bytes:
    """Commit-reveal v2 hash: blake2b-256 over the SCALE tuple the runtime hashes on reveal.

    pubkey(32) | u16 netuid | Vec<u16> uids | Vec<u16> values | Vec<u16> salt | u64 version_key
    """
    if len(pubkey) != 32:
        raise ValueError(f"pubkey must be 32 bytes, got {len(pubkey)}")
    data = (
        bytes(pubkey)
        + struct.pack("<H", netuid)
        + scale_vec_u16(uids)
        + scale_vec_u16(values)
        + scale_vec_u16(salt)
        + struct.pack("<Q", version_key)
    )
    return hashlib.blake2b(data, digest_size=32).digest()


def epoch_index(netuid: int, tempo: int, block: int) -> int:
    """Subtensor's epoch number of `block` (`get_epoch_index`): reveal windows are epochs."""
    return (block + netuid + 1) // (tempo + 1)


def reveal_window(netuid: int, tempo: int, period: int, commit_block: int) -> tuple[int, int]:
    """First and last block (inclusive) in which weights committed at `commit_block` may be
    revealed: the whole epoch `epoch_index(commit_block) + period` (RevealPeriodEpochs)."""
    epoch = epoch_index(netuid, tempo, commit_block) + period
    first = epoch * (tempo + 1) - netuid - 1
    return first, first + tempo


def salt_words(salt: bytes) -> list[int]:
    """The Chain interface's salt bytes as the runtime's `Vec<u16>` salt (little-endian pairs).

    The same bytes always give the same words, so a restarted validator that kept its salt
    reveals what it committed.
    """
    if not salt or len(salt) % 2 or len(salt) > MAX_SALT_BYTES:
        raise ValueError(f"salt must be 2..{MAX_SALT_BYTES} bytes of even length, got {len(salt)}")
    return [v for (v,) in struct.iter_unpack("<H", salt)]


def to_bytes32(digest: str) -> bytes:
    """64 lowercase hex chars (the Python types' digest format) -> 32 bytes."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"digest must be 64 lowercase hex characters, got {digest!r}")
    return bytes.fromhex(digest)


def _u32(value: int, what: str) -> bytes:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{what} must fit in u32, got {value}")
    return _U32.pack(value)


def encode_records(records: dict[bytes, bytes]) -> bytes:
    """Payload holding one body per record kind (sorted by kind, so encoding is canonical)."""
    out = bytearray(MAGIC + bytes([PAYLOAD_VERSION]))
    for kind in sorted(records):
        body = records[kind]
        if len(kind) != 1 or len(body) > 255:
            raise ValueError(f"record {kind!r}: one-byte kind and <= 255-byte body required")
        out += kind + bytes([len(body)]) + body
    if len(out) > MAX_PAYLOAD_BYTES:
        raise ValueError(
            f"commitment payload is {len(out)} bytes, over the {MAX_PAYLOAD_BYTES}-byte budget "
            f"({MAX_FIELDS} Raw fields of {RAW_FIELD_BYTES}): shorten the uri"
        )
    return bytes(out)


def decode_records(payload: bytes) -> dict[bytes, bytes] | None:
    """kind -> body, or None when the payload is not ours (other tools may commit too)."""
    head = len(MAGIC) + 1
    if payload[: len(MAGIC)] != MAGIC or len(payload) < head or payload[2] != PAYLOAD_VERSION:
        return None
    records, i = {}, head
    while i < len(payload):
        if i + 2 > len(payload) or i + 2 + payload[i + 1] > len(payload):
            return None  # truncated
        kind, size = payload[i : i + 1], payload[i + 1]
        records[kind] = payload[i + 2 : i + 2 + size]
        i += 2 + size
    return records


def commit_body(round: int, digest: str) -> bytes:
    return _u32(round, "round") + to_bytes32(digest)


def parse_commit(body: bytes) -> tuple[int, str] | None:
    if len(body) != 36:
        return None
    return _U32.unpack(body[:4])[0], body[4:].hex()


def encode_commitment(round: int, digest: str) -> bytes:
    """A miner's commitment payload: round and artifact digest (41 bytes, one Raw field)."""
    return encode_records({KIND_COMMIT: commit_body(round, digest)})


def decode_commitment(payload: bytes) -> tuple[int, str] | None:
    """(round, digest) from a payload, or None if it holds no well-formed commit record."""
    body = (decode_records(payload) or {}).get(KIND_COMMIT)
    return parse_commit(body) if body is not None else None


def checkpoint_body(round: int, digest: str, uri: str, deltas_digest: str) -> bytes:
    return _u32(round, "round") + to_bytes32(digest) + to_bytes32(deltas_digest) + uri.encode()


def parse_checkpoint(body: bytes, block: int, publisher: str) -> Checkpoint | None:
    if len(body) < 68:
        return None
    uri = body[68:].decode("utf-8", errors="replace")
    return Checkpoint(
        _U32.unpack(body[:4])[0], body[4:36].hex(), uri, body[36:68].hex(), block, publisher
    )


def task_body(
    task_id: int, base_hash: str, assignment_hash: str, data_hash: str, uri: str
) -> bytes:
    hashes = b"".join(to_bytes32(h) for h in (base_hash, assignment_hash, data_hash))
    return _u32(task_id, "task_id") + hashes + uri.encode()


def parse_task(body: bytes) -> Task | None:
    if len(body) < 100:
        return None
    base, assignment, data = (body[4 + 32 * i : 36 + 32 * i].hex() for i in range(3))
    return Task(
        _U32.unpack(body[:4])[0], base, assignment, data, body[100:].decode("utf-8", "replace")
    )


def commitment_info(payload: bytes) -> dict:
    """The `info` argument of Commitments.set_commitment: Raw fields of <= 128 bytes, in order.

    The double list is substrate-interface's shape for `BoundedVec<Data>` (a newtype around a
    Vec); each Raw variant is named by its length, e.g. {"Raw41": "0x..."}.
    """
    if not payload:
        raise ValueError("empty commitment payload")
    chunks = [payload[i : i + RAW_FIELD_BYTES] for i in range(0, len(payload), RAW_FIELD_BYTES)]
    if len(chunks) > MAX_FIELDS:
        raise ValueError(f"payload of {len(payload)} bytes needs more than {MAX_FIELDS} fields")
    return {"fields": [[{f"Raw{len(c)}": "0x" + c.hex()} for c in chunks]]}


def payload_from_info(info: Any) -> bytes:
    """Concatenated Raw field bytes of a decoded CommitmentInfo, in any shape the decoders use.

    substrate-interface gives {"fields": [{"Raw41": "0x.."}]}; other decoders nest the fields
    in extra tuples or give bytes as int tuples, so walk the structure for Raw* variants.
    """
    if isinstance(info, dict):
        out = b""
        for key, value in info.items():
            raw = isinstance(key, str) and (key.startswith("Raw") or key == "BigRaw")
            out += _as_bytes(value) if raw else payload_from_info(value)
        return out
    if isinstance(info, list | tuple):
        return b"".join(payload_from_info(item) for item in info)
    return b""


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return bytes.fromhex(value[2:]) if value.startswith("0x") else value.encode()
    if isinstance(value, list | tuple):
        if len(value) == 1 and isinstance(value[0], list | tuple | bytes | str):
            return _as_bytes(value[0])
        return bytes(value)
    raise ValueError(f"cannot read Raw commitment bytes from {value!r}")


# ---------------------------------------------------------------------------- keys


def keypair_from(
    *, mnemonic: str | None = None, seed: str | None = None, uri: str | None = None
) -> Keypair:
    """An sr25519 Keypair from exactly one of a mnemonic, a 0x hex seed or a URI ("//Alice")."""
    given = [x for x in (mnemonic, seed, uri) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of mnemonic, seed or uri")
    if mnemonic is not None:
        return Keypair.create_from_mnemonic(mnemonic.strip())
    if seed is not None:
        return Keypair.create_from_seed(seed.strip())
    return Keypair.create_from_uri(uri)


def load_hotkey(
    name: str = "default", hotkey: str = "default", wallet_path: str | Path = DEFAULT_WALLET_PATH
) -> Keypair:
    """The hotkey of a standard Bittensor wallet: WALLET_PATH/NAME/hotkeys/HOTKEY (plain JSON).

    The file holds secretPhrase/secretSeed/privateKey/publicKey/ss58Address (bittensor-wallet's
    format); the key is rebuilt from the seed, the phrase or the private key, in that order, and
    checked against the stored public key.
    """
    path = Path(wallet_path).expanduser() / name / "hotkeys" / hotkey
    if not path.is_file():
        raise FileNotFoundError(
            f"no hotkey file {path}: check --wallet-name/--hotkey/--wallet-path"
        )
    text = read_private(path, "hotkey file")  # refused when other users may read or write it
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"{path} is not a plain JSON key file (encrypted hotkeys unsupported)"
        ) from None
    if doc.get("secretSeed"):
        kp = Keypair.create_from_seed(doc["secretSeed"])
    elif doc.get("secretPhrase"):
        kp = Keypair.create_from_mnemonic(doc["secretPhrase"])
    elif doc.get("privateKey"):
        kp = Keypair.create_from_private_key(doc["privateKey"], ss58_format=42)
    else:
        raise ValueError(f"{path} has no secretSeed, secretPhrase or privateKey")
    want = doc.get("publicKey")
    if want and bytes.fromhex(want.removeprefix("0x")) != kp.public_key:
        raise ValueError(f"{path}: secret does not match its publicKey")
    return kp
