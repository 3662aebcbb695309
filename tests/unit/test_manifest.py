"""Signed manifests: frozen wire format, both key types, every rejection code, strict parsing.

.venv/bin/python -m pytest -q tests/unit/test_manifest.py
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from substrateinterface import Keypair

from protocol.artifact.delta import DeltaMeta
from protocol.chain import Commitment
from protocol.identity.keys import SECP256K1_N, EthSigner, Sr25519Signer, verify_signature
from protocol.round.manifest import (
    CODES,
    MAX_JSON_BYTES,
    OK,
    Manifest,
    SignedManifest,
    check_manifest,
    delta_matches_manifest,
    evm_chain,
    manifest_for,
    sign,
    subtensor_chain,
)
from protocol.round.shards import shard_key
from protocol.storage import ObjectRef

ETH_KEY = "0x" + hashlib.sha256(b"manifest-eth").hexdigest()
OTHER_KEY = "0x" + hashlib.sha256(b"manifest-other").hexdigest()
ALICE = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"  # ss58 of //Alice
BASE, ASSIGN, ART = "a" * 64, "b" * 64, "c" * 64
ALICE_SHARD = shard_key(3, ALICE, 7)  # make_manifest's task, hotkey and round
DEADLINE = 1000

# Frozen by hand: if either changes, the wire format changed and every committed digest with it.
GOLDEN_BODY = (
    '{"artifact_sha256":"' + ART + '","artifact_size":123456,"assignment_hash":"' + ASSIGN + '",'
    '"base_hash":"' + BASE + '","chain":"subtensor:42","encoding":"bfloat16",'
    '"format":"moesaic-manifest","hotkey":"' + ALICE + '","round":7,"task_id":3,'
    '"tokens":1000000,"uri":"http://127.0.0.1:8765/objects/' + ART + '#d0.safetensors",'
    '"version":1}'
)
GOLDEN_DIGEST = "d01f4efcfb15d103b577c4d0cb1307b45d048b7610c492608bde7451d15af3bc"


def make_manifest(hotkey: str = ALICE, **changes) -> Manifest:
    fields = dict(
        chain="subtensor:42",
        round=7,
        task_id=3,
        base_hash=BASE,
        assignment_hash=ASSIGN,
        artifact_sha256=ART,
        artifact_size=123456,
        uri=f"http://127.0.0.1:8765/objects/{ART}#d0.safetensors",
        hotkey=hotkey,
        tokens=1_000_000,
        encoding="bfloat16",
    )
    return Manifest(**{**fields, **changes})


@pytest.fixture(scope="module")
def eth():
    return EthSigner(ETH_KEY)


@pytest.fixture(scope="module")
def other():
    return EthSigner(OTHER_KEY)


@pytest.fixture(scope="module")
def alice():
    return Sr25519Signer(Keypair.create_from_uri("//Alice"))


# --- format ------------------------------------------------------------------------------------


def test_golden_digest():
    m = make_manifest()
    assert m.body_bytes().decode() == GOLDEN_BODY
    assert m.digest() == GOLDEN_DIGEST == hashlib.sha256(GOLDEN_BODY.encode()).hexdigest()


VALID_ENCODINGS = ["float32", "bfloat16", "float16", "int8", "lowrank8", "lowrank8-int8",
                   "lowrank1", "lowrank65536-int8"]  # fmt: skip
BAD_ENCODINGS = ["int4", "lowrank0", "lowrank08", "lowrank-3", "lowrankX", "lowrank65537",
                 "LOWRANK8", "lowrank8-int4", "lowrank", "", 8, None]  # fmt: skip


@pytest.mark.parametrize("encoding", VALID_ENCODINGS + BAD_ENCODINGS)
def test_encodings_mirror_delta(encoding):
    """The manifest (no torch) accepts exactly the encodings a delta's metadata accepts."""

    def accepts(make) -> bool:
        try:
            make()
        except ValueError:
            return False
        return True

    fields = dict(
        base_hash=BASE, assignment_hash=ASSIGN, round=7, tokens=10, shard=ALICE_SHARD,
        encoding=encoding,
    )  # fmt: skip
    in_delta = accepts(lambda: DeltaMeta(**fields))
    assert accepts(lambda: make_manifest(encoding=encoding)) == in_delta
    assert in_delta == (encoding in VALID_ENCODINGS)


def test_chain_labels():
    assert subtensor_chain(42) == "subtensor:42"
    registry = "0x" + "AbCd" * 10
    assert evm_chain(31337, registry) == "evm:31337:0x" + "abcd" * 10
    make_manifest(chain=evm_chain(31337, registry))  # a valid chain field
    with pytest.raises(ValueError, match="registry"):
        evm_chain(1, "0x1234")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": "other"}, "format"),
        ({"version": 2}, "version"),
        ({"version": True}, "version"),
        ({"chain": "42"}, "chain"),
        ({"round": -1}, "round"),
        ({"round": True}, "round"),
        ({"round": 2**64}, "round"),
        ({"task_id": "3"}, "task_id"),
        ({"tokens": 1.5}, "tokens"),
        ({"base_hash": "A" * 64}, "base_hash"),
        ({"assignment_hash": "b" * 63}, "assignment_hash"),
        ({"artifact_sha256": None}, "artifact_sha256"),
        ({"artifact_size": 0}, "artifact_size"),
        ({"uri": ""}, "uri"),
        ({"uri": "http://x/ y"}, "uri"),
        ({"uri": "http://x/" + "a" * 600}, "512"),
        ({"hotkey": "alice"}, "hotkey"),
        ({"hotkey": "0x1234"}, "hotkey"),
        ({"encoding": "int4"}, "encoding"),
        ({"encoding": "lowrank08"}, "lowrank<R>"),
    ],
)
def test_manifest_rejects_bad_fields(changes, match):
    with pytest.raises(ValueError, match=match):
        make_manifest(**changes)


# --- signing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["eth", "alice"])
def test_sign_and_verify(key, request):
    signer = request.getfixturevalue(key)
    signed = sign(make_manifest(signer.identity), signer)
    assert signed.verify()
    again = SignedManifest.from_json(signed.to_json())
    assert again == signed and again.verify()
    tampered = SignedManifest(replace(signed.manifest, tokens=2_000_000), signed.signature)
    assert not tampered.verify()


def test_sign_refuses_another_key(eth, alice):
    with pytest.raises(ValueError, match="not the manifest hotkey"):
        sign(make_manifest(alice.identity), eth)


def test_manifest_for_takes_claims_from_meta_and_location_from_ref():
    meta = DeltaMeta(
        base_hash=BASE, assignment_hash=ASSIGN, round=7, tokens=10, shard=shard_key(4, ALICE, 7),
        encoding="float16",
    )  # fmt: skip
    ref = ObjectRef(sha256=ART, size=99, uri=f"file:///store/{ART}#d.safetensors")
    m = manifest_for(meta, ref, chain="subtensor:1", task_id=4, hotkey=ALICE)
    assert (m.round, m.tokens, m.encoding, m.task_id) == (7, 10, "float16", 4)
    assert (m.artifact_sha256, m.artifact_size, m.uri) == (ref.sha256, ref.size, ref.uri)
    assert delta_matches_manifest(meta, m) == OK


# --- check_manifest ----------------------------------------------------------------------------


def honest_case(signer, **manifest_changes) -> dict:
    """check_manifest kwargs for a signer that signed and committed in time."""
    signed = sign(make_manifest(signer.identity, **manifest_changes), signer)
    commitment = Commitment(signer.identity, signed.manifest.round, signed.commitment_digest(), 990)
    return dict(
        signed=signed,
        commitment=commitment,
        expected_chain="subtensor:42",
        expected_round=7,
        expected_task_id=3,
        expected_base_hash=BASE,
        expected_assignment_hash=ASSIGN,
        registered_hotkeys=[signer.identity, ALICE],
        deadline_block=DEADLINE,
        max_artifact_bytes=1 << 20,
    )


@pytest.mark.parametrize("key", ["eth", "alice"])
def test_honest_manifest_passes(key, request):
    case = honest_case(request.getfixturevalue(key))
    assert check_manifest(**case) == OK
    case["signed"] = case["signed"].to_json()  # the JSON a validator downloads
    assert check_manifest(**case) == OK


def _defect(name: str, case: dict, other) -> None:
    """Apply exactly one defect to an honest case, in place."""
    c, signed = case["commitment"], case["signed"]
    if name == "malformed":
        case["signed"] = signed.to_json()[:-1]
    elif name == "bad_signature":  # the right bytes, signed by another key
        forged = other.sign(signed.manifest.signing_message())
        case["signed"] = SignedManifest(signed.manifest, forged)
    elif name == "unregistered":
        case["registered_hotkeys"] = [ALICE]
    elif name == "not_committer":
        case["commitment"] = replace(c, hotkey=other.identity)
    elif name == "digest_mismatch":
        case["commitment"] = replace(c, digest="d" * 64)
    elif name == "late":
        case["commitment"] = replace(c, block=DEADLINE + 1)
    elif name == "wrong_chain":
        case["expected_chain"] = "subtensor:43"
    elif name == "wrong_round":
        case["expected_round"] = 8
    elif name == "wrong_task":
        case["expected_task_id"] = 4
    elif name == "wrong_base":
        case["expected_base_hash"] = "e" * 64
    elif name == "wrong_assignment":
        case["expected_assignment_hash"] = "f" * 64
    elif name == "too_large":
        case["max_artifact_bytes"] = 123455
    else:
        raise AssertionError(name)


CHECK_CODES = [c for c in CODES if c not in ("ok", "wrong_encoding", "wrong_tokens", "wrong_shard")]


@pytest.mark.parametrize("code", CHECK_CODES)
def test_each_defect_gives_its_code(code, eth, other):
    case = honest_case(eth)
    _defect(code, case, other)
    verdict = check_manifest(**case)
    assert (verdict.ok, verdict.code) == (False, code), verdict.reason
    assert verdict.reason


@pytest.mark.parametrize(
    "changes, code",
    [
        ({"chain": "subtensor:43"}, "wrong_chain"),
        ({"round": 6}, "wrong_round"),
        ({"task_id": 2}, "wrong_task"),
        ({"base_hash": "e" * 64}, "wrong_base"),
        ({"assignment_hash": "f" * 64}, "wrong_assignment"),
        ({"artifact_size": 2 << 20}, "too_large"),
    ],
)
def test_signed_and_committed_but_wrong_claims(changes, code, eth):
    # the miner signed and committed this manifest honestly; its claims are what is wrong
    verdict = check_manifest(**honest_case(eth, **changes))
    assert verdict.code == code, verdict.reason


def test_commitment_for_another_round(eth):
    case = honest_case(eth)
    case["commitment"] = replace(case["commitment"], round=6)
    assert check_manifest(**case).code == "wrong_round"


def test_eth_hotkeys_compare_case_insensitively(eth):
    case = honest_case(eth)
    case["registered_hotkeys"] = [eth.identity.lower()]
    case["commitment"] = replace(
        case["commitment"], hotkey=eth.identity.upper().replace("0X", "0x")
    )
    assert check_manifest(**case) == OK


def test_copied_manifest_is_worthless(eth, other):
    victim = honest_case(eth)
    original = victim["signed"].manifest
    copied = sign(replace(original, hotkey=other.identity), other)
    assert copied.verify() and copied.manifest.digest() != original.digest()
    assert copied.commitment_digest() != victim["signed"].commitment_digest()
    # the copier presents its re-signed copy against the victim's commitment ...
    case = {**victim, "signed": copied, "registered_hotkeys": [eth.identity, other.identity]}
    assert check_manifest(**case).code == "not_committer"
    # ... or against the victim's digest committed under its own key ...
    case["commitment"] = replace(victim["commitment"], hotkey=other.identity)
    assert check_manifest(**case).code == "digest_mismatch"
    # ... or presents the victim's manifest untouched with that commitment
    case["signed"] = victim["signed"]
    assert check_manifest(**case).code == "not_committer"


# --- delta metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, code",
    [
        ({}, "ok"),
        ({"round": 8}, "wrong_round"),
        ({"base_hash": "e" * 64}, "wrong_base"),
        ({"assignment_hash": "f" * 64}, "wrong_assignment"),
        ({"encoding": "float32"}, "wrong_encoding"),
        ({"tokens": 1}, "wrong_tokens"),
        # Another miner's shard of the round, and alice's own shard of another round or task.
        ({"shard": shard_key(3, "0x" + "ab" * 20, 7)}, "wrong_shard"),
        ({"shard": shard_key(3, ALICE, 6)}, "wrong_shard"),
        ({"shard": shard_key(2, ALICE, 7)}, "wrong_shard"),
    ],
)
def test_delta_matches_manifest(changes, code):
    fields = dict(
        base_hash=BASE, assignment_hash=ASSIGN, round=7, tokens=1_000_000, shard=ALICE_SHARD
    )
    meta = DeltaMeta(**{**fields, "encoding": "bfloat16", **changes})
    verdict = delta_matches_manifest(meta, make_manifest())
    assert (verdict.ok, verdict.code) == (code == "ok", code), verdict.reason


# --- strict JSON -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_json(alice) -> str:
    return sign(make_manifest(alice.identity), alice).to_json()


def _edit(text: str, fn) -> str:
    data = json.loads(text)
    fn(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t: _edit(t, lambda d: d["manifest"].update(extra=1)), r"unknown \['extra'\]"),
        (lambda t: _edit(t, lambda d: d.update(extra=1)), r"unknown \['extra'\]"),
        (lambda t: _edit(t, lambda d: d["manifest"].pop("tokens")), r"missing \['tokens'\]"),
        (lambda t: _edit(t, lambda d: d.pop("signature")), r"missing \['signature'\]"),
        (lambda t: t.replace('"round":7', '"round":7,"round":8'), "duplicate JSON key 'round'"),
        (lambda t: t.replace('"tokens":1000000', '"tokens":NaN'), "NaN"),
        (lambda t: t.replace('"round":7', '"round":true'), "round"),
        (lambda t: t[:-1] + ',"pad":"' + "x" * MAX_JSON_BYTES + '"}', "over 8192"),
        (lambda t: "[]", "not a JSON object"),
        (lambda t: t.replace('"signature":"0x', '"signature":"0X'), "signature"),
        (lambda t: b"\xff" + t.encode(), "UTF-8"),
        (lambda t: t[:40], "Expecting|Unterminated"),
    ],
)
def test_strict_parsing(signed_json, mutate, match):
    with pytest.raises(ValueError, match=match):
        SignedManifest.from_json(mutate(signed_json))


def test_parsing_round_trips_exactly(signed_json):
    assert SignedManifest.from_json(signed_json).to_json() == signed_json
    assert SignedManifest.from_json(signed_json.encode()).to_json() == signed_json


def test_commitment_digest_is_over_the_exact_uploaded_bytes(eth):
    case = honest_case(eth)
    raw = case["signed"].to_json().encode()
    assert hashlib.sha256(raw).hexdigest() == case["signed"].commitment_digest()
    assert check_manifest(**{**case, "signed": raw}) == OK
    # Same claims, different bytes (whitespace): parses, but is not what was committed.
    import json as _json

    spaced = _json.dumps(_json.loads(raw), indent=1).encode()
    assert check_manifest(**{**case, "signed": spaced}).code == "digest_mismatch"


def _eth_twins(signature: str) -> dict[str, str]:
    """Encodings of one ECDSA signature anyone can derive without the key: the high-s twin
    (r, n - s) with the flipped recovery id, and each spelt with v = 0/1 instead of 27/28."""
    sig = bytes.fromhex(signature.removeprefix("0x"))
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    high = r + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - v])
    return {
        "high_s": "0x" + high.hex(),
        "v_0_1": "0x" + (sig[:64] + bytes([v - 27])).hex(),
        "high_s_v_0_1": "0x" + (high[:64] + bytes([high[64] - 27])).hex(),
    }


def test_malleated_eth_signatures_do_not_verify(eth):
    """Attack: re-encode a published manifest signature (high-s twin, v = 0/1) to get a second
    valid signed document, hence a second commitment digest, for the same manifest."""
    case = honest_case(eth)
    signed = case["signed"]
    assert verify_signature(eth.identity, signed.manifest.signing_message(), signed.signature)
    for name, twin in _eth_twins(signed.signature).items():
        # The twins are real ECDSA signatures: the library's recovery accepts them ...
        recovered = Account.recover_message(
            encode_defunct(primitive=signed.manifest.signing_message()),
            signature=bytes.fromhex(twin[2:]),
        )
        assert recovered == eth.identity, name
        # ... and ours does not, so the manifest has exactly one valid signature.
        forged = SignedManifest(signed.manifest, twin)
        assert not forged.verify(), name
        assert forged.commitment_digest() != signed.commitment_digest()
        commitment = replace(case["commitment"], digest=forged.commitment_digest())
        verdict = check_manifest(**{**case, "signed": forged, "commitment": commitment})
        assert verdict.code == "bad_signature", name
