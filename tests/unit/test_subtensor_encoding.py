"""Byte-exact encodings of the subtensor backend, and wallet hotkey loading; no node needed.

The commit-reveal hash is checked against blake2b over the byte layout written out by hand
and against scalecodec's encoding of the same SCALE tuple; the commitment payload is frozen by
a golden hex string so a format change is a deliberate, visible edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from protocol.chain import Checkpoint, Task
from protocol.chain.subtensor_codec import (
    KIND_CHECKPOINT,
    KIND_TASK,
    MAX_PAYLOAD_BYTES,
    RAW_FIELD_BYTES,
    checkpoint_body,
    commit_hash,
    commitment_info,
    decode_commitment,
    decode_records,
    encode_commitment,
    encode_records,
    epoch_index,
    keypair_from,
    load_hotkey,
    parse_checkpoint,
    parse_task,
    payload_from_info,
    reveal_window,
    salt_words,
    scale_compact,
    task_body,
)


@pytest.fixture(autouse=True)
def _private_umask():
    """Files these tests write are 0600, as btcli writes key files: a key file other users may
    read is refused (protocol.identity.keyfile)."""
    old = os.umask(0o077)
    yield
    os.umask(old)


MNEMONIC = "legal winner thank year wave sausage worth useful legal winner thank yellow"
PUBKEY = bytes(range(32))
D1, D2, D3 = (hashlib.sha256(t).hexdigest() for t in (b"one", b"two", b"three"))


def test_commit_hash_is_blake2b_over_the_documented_layout():
    uids, values, salt = [0, 1, 300], [65535, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]
    layout = (
        PUBKEY
        + b"\x07\x00"  # u16 LE netuid 7
        + b"\x0c" + b"\x00\x00" + b"\x01\x00" + b"\x2c\x01"  # compact(3) + u16 LE uids
        + b"\x0c" + b"\xff\xff" + b"\x01\x00" + b"\x02\x00"  # values
        + b"\x20" + b"".join(struct.pack("<H", s) for s in salt)  # compact(8) + salt
        + struct.pack("<Q", 2**40 + 5)  # u64 LE version key
    )  # fmt: skip
    want = hashlib.blake2b(layout, digest_size=32).digest()
    assert commit_hash(PUBKEY, 7, uids, values, salt, 2**40 + 5) == want


def test_commit_hash_matches_scalecodec_tuple_encoding():
    from scalecodec.base import RuntimeConfiguration
    from scalecodec.type_registry import load_type_registry_preset

    rc = RuntimeConfiguration()
    rc.update_type_registry(load_type_registry_preset("legacy"))
    args = (7, list(range(70)), [9] * 70, [65535] * 8, 3)  # 70 entries: two-byte compact length
    scale = rc.create_scale_object("([u8; 32], u16, Vec<u16>, Vec<u16>, Vec<u16>, u64)")
    data = scale.encode(("0x" + PUBKEY.hex(), *args)).data
    assert commit_hash(PUBKEY, *args) == hashlib.blake2b(data, digest_size=32).digest()
    with pytest.raises(ValueError, match="32 bytes"):
        commit_hash(PUBKEY[:31], *args)


@pytest.mark.parametrize(
    ("n", "encoded"),
    [(0, "00"), (63, "fc"), (64, "0101"), (16383, "fdff"), (16384, "02000100")],
)
def test_scale_compact_boundaries(n, encoded):
    assert scale_compact(n).hex() == encoded


def test_epoch_index_follows_subtensor():
    # (block + netuid + 1) // (tempo + 1): netuid 11, tempo 10 -> epoch 0 ends at block 9.
    assert [epoch_index(11, 10, b) for b in (0, 9, 10, 20, 21)] == [1, 1, 2, 2, 3]


def test_reveal_window_is_the_epoch_after_the_commit():
    # netuid 2, tempo 10: epoch 6 is blocks 63..73, so a commit in block 65 reveals in 74..84
    # (what spec 293 stored in WeightCommits for that commit under chopsticks).
    assert reveal_window(2, 10, 1, 65) == (74, 84)
    assert reveal_window(2, 10, 1, 63) == (74, 84) and reveal_window(2, 10, 1, 62) == (63, 73)
    assert reveal_window(2, 10, 2, 65) == (85, 95)
    first, last = reveal_window(11, 360, 1, 1000)
    assert (
        epoch_index(11, 360, first) == epoch_index(11, 360, 1000) + 1 == epoch_index(11, 360, last)
    )
    assert epoch_index(11, 360, first - 1) == epoch_index(11, 360, last + 1) - 2


def test_salt_words_are_little_endian_pairs():
    assert salt_words(b"\x01\x00\xff\xff") == [1, 65535]
    assert len(salt_words(bytes(32))) == 16
    for bad in (b"", b"\x01", bytes(66)):
        with pytest.raises(ValueError, match="salt must be"):
            salt_words(bad)


def test_commitment_payload_golden_and_round_trip():
    payload = encode_commitment(258, D1)
    assert payload.hex() == "4d530163" + "24" + "02010000" + D1  # MS, v1, 'c', 36, u32 LE 258
    assert len(payload) == 41 <= RAW_FIELD_BYTES
    assert decode_commitment(payload) == (258, D1)
    assert decode_commitment(encode_commitment(2**32 - 1, D2)) == (2**32 - 1, D2)


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello world", b"MS\x02c\x24" + bytes(36), b"MS\x01c\x24" + bytes(10), b"MS\x01c"],
)
def test_foreign_or_truncated_payloads_decode_to_none(payload):
    assert decode_commitment(payload) is None


def test_commitment_rejects_bad_input():
    with pytest.raises(ValueError, match="u32"):
        encode_commitment(2**32, D1)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        encode_commitment(1, D1.upper())


def test_checkpoint_and_task_records_share_one_commitment():
    records = {
        KIND_CHECKPOINT: checkpoint_body(5, D1, "hf://org/merged@rev5", D2),
        KIND_TASK: task_body(2, D1, D2, D3, "hf://org/task-2"),
    }
    payload = encode_records(records)
    assert RAW_FIELD_BYTES < len(payload) <= MAX_PAYLOAD_BYTES  # needs two Raw fields
    back = decode_records(payload)
    assert back == records
    assert parse_checkpoint(back[KIND_CHECKPOINT], 99, "5Hot") == Checkpoint(
        5, D1, "hf://org/merged@rev5", D2, 99, "5Hot"
    )
    assert parse_task(back[KIND_TASK]) == Task(2, D1, D2, D3, "hf://org/task-2")


def test_payload_budget_is_enforced():
    with pytest.raises(ValueError, match="budget"):
        encode_records(
            {
                KIND_CHECKPOINT: checkpoint_body(1, D1, "u" * 180, D2),
                KIND_TASK: task_body(1, D1, D2, D3, "v" * 120),
            }
        )


def test_commitment_info_shape_and_inverse():
    payload = encode_records({KIND_TASK: task_body(1, D1, D2, D3, "x" * 150)})
    info = commitment_info(payload)
    assert list(info) == ["fields"] and len(info["fields"]) == 1  # BoundedVec newtype: [[...]]
    fields = info["fields"][0]
    assert [list(f) for f in fields] == [["Raw128"], [f"Raw{len(payload) - 128}"]]
    assert all(v.startswith("0x") for f in fields for v in f.values())
    assert payload_from_info(info) == payload
    # substrate-interface decodes CommitmentOf's info as a flat list of variants.
    assert payload_from_info({"fields": fields}) == payload
    # Other decoders give ((({"Raw41": ((b0, b1, ...),)},),)): ints inside tuples.
    small = encode_commitment(3, D3)
    nested = {"fields": (({"Raw41": (tuple(small),)},),)}
    assert decode_commitment(payload_from_info(nested)) == (3, D3)
    with pytest.raises(ValueError, match="empty"):
        commitment_info(b"")


def _write_hotkey(root, name, hotkey, doc) -> None:
    path = root / name / "hotkeys" / hotkey
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))


def _standard_doc(kp) -> dict:
    """The fields bittensor-wallet writes into an unencrypted hotkey file."""
    return {
        "accountId": "0x" + kp.public_key.hex(),
        "publicKey": "0x" + kp.public_key.hex(),
        "privateKey": "0x" + kp.private_key.hex(),
        "secretPhrase": MNEMONIC,
        "secretSeed": "0x" + kp.seed_hex.hex(),
        "ss58Address": kp.ss58_address,
    }


SECRETS = ("secretSeed", "secretPhrase", "privateKey")


@pytest.mark.parametrize("only", [None, *SECRETS])
def test_load_hotkey_from_standard_wallet_layout(tmp_path, only):
    kp = keypair_from(mnemonic=MNEMONIC)
    doc = _standard_doc(kp)
    if only is not None:  # just one secret in the file: each rebuilds the same key
        doc = {k: v for k, v in doc.items() if k not in SECRETS or k == only}
    _write_hotkey(tmp_path, "validator", "hk1", doc)
    loaded = load_hotkey("validator", "hk1", wallet_path=tmp_path)
    assert loaded.public_key == kp.public_key
    assert (
        loaded.ss58_address == kp.ss58_address == "5EHgWw2Af1pnoc7f1A8bfmM97W3DAYW8xr82RfhLL9oAabAe"
    )
    message = b"moesaic"
    assert kp.verify(message, loaded.sign(message))


def test_load_hotkey_errors(tmp_path):
    doc = _standard_doc(keypair_from(mnemonic=MNEMONIC))
    with pytest.raises(FileNotFoundError, match="no hotkey file"):
        load_hotkey("missing", "default", wallet_path=tmp_path)
    _write_hotkey(tmp_path, "w", "wrong", {**doc, "publicKey": "0x" + "00" * 32})
    with pytest.raises(ValueError, match="does not match"):
        load_hotkey("w", "wrong", wallet_path=tmp_path)
    (tmp_path / "w" / "hotkeys" / "enc").write_bytes(b"$NACL" + bytes(40))
    with pytest.raises(ValueError, match="encrypted"):
        load_hotkey("w", "enc", wallet_path=tmp_path)


def test_keypair_from_sources():
    alice = keypair_from(uri="//Alice")
    assert alice.ss58_address == "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    kp = keypair_from(mnemonic=MNEMONIC)
    assert keypair_from(seed="0x" + kp.seed_hex.hex()).public_key == kp.public_key
    with pytest.raises(ValueError, match="exactly one"):
        keypair_from(mnemonic=MNEMONIC, uri="//Alice")
