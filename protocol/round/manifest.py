"""The miner's signed manifest: binds one uploaded artifact to one key, chain, task and round.

Flow (docs/chain.md, "Binding an artifact to a key and a round")::

    manifest = manifest_for(meta, ref, chain=subtensor_chain(netuid), task_id=task.task_id,
                            hotkey=signer.identity)          # miner, after uploading the delta
    chain.commit(manifest.round, manifest.digest())          # before the deadline
    text = sign(manifest, signer).to_json()                  # published next to the artifact

    verdict = check_manifest(text, commitment=c, ...)        # validator, before fetching bytes
    verdict = delta_matches_manifest(meta, signed.manifest)  # validator, after reading the delta

The digest committed on chain is sha256 of the manifest's canonical JSON, and the hotkey is a
field of that JSON. So a commitment or a manifest copied by another key is worthless: re-signed
under the copier's hotkey the manifest has a different digest, which the original commitment
does not match, and the copier's own commitment lands in a later block (SN9's
sha256(model hash + hotkey), with the rest of the claim bound too).

Pure apart from signing and signature checks (protocol.identity.keys); no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from protocol.artifact.encodings import parse_encoding
from protocol.identity.hashing import canonical_json
from protocol.identity.keys import Signer, normalise, verify_signature
from protocol.round.shards import shard_key

if TYPE_CHECKING:
    from protocol.artifact.delta import DeltaMeta
    from protocol.chain import Commitment
    from protocol.storage import ObjectRef

MANIFEST_FORMAT = "moesaic-manifest"
MANIFEST_VERSION = 1
# Signatures cover this prefix + the body, so a manifest signature can never double as a
# signature of another message type (e.g. a storage request, "moesaic-store-v1\n...").
SIGN_DOMAIN = b"moesaic-manifest-v1\n"
MAX_URI_CHARS = 512
MAX_JSON_BYTES = 8 * 1024  # a real signed manifest is ~900 bytes; bounded before parsing
MAX_INT = 2**64 - 1  # fits any chain's u64; rejects absurd JSON integers early

_HEX64 = re.compile(r"[0-9a-f]{64}")
_ETH_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_SS58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,50}")  # base58 alphabet; checked fully on verify
_CHAIN = re.compile(r"[a-z][a-z0-9-]{0,31}:[A-Za-z0-9:._-]{1,200}")
_URI = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_SIGNATURE = re.compile(r"0x(?:[0-9a-f]{2}){1,256}")  # both signers emit lowercase 0x-hex

# Verdict codes, in the order check_manifest tries them, then delta_matches_manifest's own.
CODES = (
    "ok",
    "malformed",  # not a valid signed-manifest JSON document
    "bad_signature",  # the signature was not made by manifest.hotkey
    "unregistered",  # manifest.hotkey is not a registered hotkey
    "not_committer",  # the commitment was made by another key
    "digest_mismatch",  # the commitment's digest is not this manifest's digest
    "late",  # committed after the deadline block
    "wrong_chain",
    "wrong_round",
    "wrong_task",
    "wrong_base",
    "wrong_assignment",
    "too_large",  # artifact_size over the validator's cap
    "wrong_encoding",  # delta metadata disagrees with the manifest
    "wrong_tokens",
    "wrong_shard",  # the delta does not declare the committer's shard (protocol.round.shards)
)


def evm_chain(chain_id: int, registry: str) -> str:
    """Chain label for our registry contract on an EVM chain: `evm:<chain id>:<0x registry>`."""
    if not _ETH_ADDRESS.fullmatch(registry):
        raise ValueError(f"registry {registry!r} is not a 0x address")
    return f"evm:{int(chain_id)}:{registry.lower()}"  # lowercase: one label per registry


def subtensor_chain(netuid: int) -> str:
    """Chain label for a Bittensor subnet: `subtensor:<netuid>`."""
    return f"subtensor:{int(netuid)}"


@dataclass(frozen=True)
class Manifest:
    """What a miner claims about one artifact. Every field is part of the committed digest."""

    chain: str  # which deployment: evm_chain(...) or subtensor_chain(...)
    round: int  # protocol round the artifact was produced for
    task_id: int  # Task.task_id the round belongs to
    base_hash: str  # sha256_dir of the base checkpoint trained from
    assignment_hash: str  # Assignment.hash() of the experts the artifact covers
    artifact_sha256: str  # sha256 of the exact uploaded bytes (ObjectRef.sha256)
    artifact_size: int  # bytes uploaded (ObjectRef.size)
    uri: str  # where to fetch them (ObjectRef.uri)
    hotkey: str  # the signer's identity: 0x address or ss58
    tokens: int  # training tokens claimed (DeltaMeta.tokens)
    encoding: str  # wire encoding (DeltaMeta.encoding; protocol.artifact.encodings)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def __post_init__(self):
        _check_literal("format", self.format, MANIFEST_FORMAT)
        _check_literal("version", self.version, MANIFEST_VERSION)
        _check_str("chain", self.chain, _CHAIN, "a chain label like subtensor:42 or evm:1:0x...")
        for name in ("base_hash", "assignment_hash", "artifact_sha256"):
            _check_str(name, getattr(self, name), _HEX64, "a lowercase hex sha256")
        for name in ("round", "task_id", "tokens"):
            _check_int(name, getattr(self, name), 0)
        _check_int("artifact_size", self.artifact_size, 1)
        _check_str("uri", self.uri, _URI, "printable ASCII without spaces")
        if len(self.uri) > MAX_URI_CHARS:
            raise ValueError(f"uri is {len(self.uri)} chars, over {MAX_URI_CHARS}")
        if not isinstance(self.hotkey, str) or not (
            _ETH_ADDRESS.fullmatch(self.hotkey) or _SS58.fullmatch(self.hotkey)
        ):
            raise ValueError(f"hotkey {self.hotkey!r} is not a 0x address or an ss58 address")
        parse_encoding(self.encoding)  # ValueError naming the valid encodings

    def body_bytes(self) -> bytes:
        """Canonical JSON of every field: the bytes the digest and the signature cover."""
        return canonical_json(asdict(self))

    def digest(self) -> str:
        """Hex sha256 of body_bytes(): the identity of the claims (what the signature covers).
        The on-chain commitment is `SignedManifest.commitment_digest()`."""
        return hashlib.sha256(self.body_bytes()).hexdigest()

    def signing_message(self) -> bytes:
        """The exact bytes the hotkey signs."""
        return SIGN_DOMAIN + self.body_bytes()


_FIELDS = frozenset(f.name for f in fields(Manifest))


def _check_literal(name: str, value, expected) -> None:
    if type(value) is not type(expected) or value != expected:
        raise ValueError(f"{name} {value!r} unsupported (want {expected!r})")


def _check_str(name: str, value, pattern: re.Pattern, what: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{name} {value!r} is not {what}")


def _check_int(name: str, value, low: int) -> None:
    # bool is an int subclass; JSON true must not pass as 1
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_INT:
        raise ValueError(f"{name} {value!r} is not an integer in [{low}, 2**64)")


def manifest_for(
    meta: DeltaMeta, ref: ObjectRef, *, chain: str, task_id: int, hotkey: str
) -> Manifest:
    """The manifest of an uploaded delta: claims from its metadata, location from its ref."""
    return Manifest(
        chain=chain,
        round=meta.round,
        task_id=task_id,
        base_hash=meta.base_hash,
        assignment_hash=meta.assignment_hash,
        artifact_sha256=ref.sha256,
        artifact_size=ref.size,
        uri=ref.uri,
        hotkey=hotkey,
        tokens=meta.tokens,
        encoding=meta.encoding,
    )


@dataclass(frozen=True)
class SignedManifest:
    """A manifest and the 0x-hex signature of its signing_message() by manifest.hotkey."""

    manifest: Manifest
    signature: str

    def __post_init__(self):
        if not isinstance(self.manifest, Manifest):
            raise ValueError("manifest is not a Manifest")
        _check_str("signature", self.signature, _SIGNATURE, "0x + lowercase hex (<= 256 bytes)")

    def verify(self) -> bool:
        """Whether the signature was made by manifest.hotkey over this manifest."""
        m = self.manifest
        return verify_signature(m.hotkey, m.signing_message(), self.signature)

    def to_json(self) -> str:
        """Canonical JSON: {"manifest": {...}, "signature": "0x..."}."""
        body = {"manifest": asdict(self.manifest), "signature": self.signature}
        return canonical_json(body).decode()

    def commitment_digest(self) -> str:
        """What the miner commits on chain: sha256 of the exact bytes it uploads (to_json()).

        The network store is content-addressed, so a validator fetches the manifest by this
        digest and the bytes verify themselves; the signature inside and the committer check
        bind it to the hotkey. (sr25519 signatures are randomised: sign once, upload those
        bytes, commit their digest.)"""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedManifest:
        """Parse and validate strictly; any defect is a ValueError naming it.

        Rejected: over MAX_JSON_BYTES, invalid UTF-8 or JSON, duplicate keys, NaN/Infinity,
        unknown or missing fields, and any field value Manifest refuses.
        """
        raw = text.encode() if isinstance(text, str) else bytes(text)
        if len(raw) > MAX_JSON_BYTES:
            raise ValueError(f"signed manifest is {len(raw)} bytes, over {MAX_JSON_BYTES}")
        data = _strict_loads(raw)
        _require_fields("signed manifest", data, {"manifest", "signature"})
        _require_fields("manifest", data["manifest"], _FIELDS)
        return cls(Manifest(**data["manifest"]), data["signature"])


def _strict_loads(raw: bytes):
    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError as e:
        raise ValueError(f"signed manifest is not UTF-8: {e}") from None
    except RecursionError:
        raise ValueError("signed manifest nests too deeply") from None


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last duplicate silently; two readers could then disagree on a value
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate JSON key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _require_fields(what: str, data, expected: frozenset[str] | set[str]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} is not a JSON object")
    if set(data) != expected:
        unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
        raise ValueError(f"{what} fields wrong: unknown {unknown}, missing {missing}")


def sign(manifest: Manifest, signer: Signer) -> SignedManifest:
    """Sign with the manifest's own hotkey; a different key is a ValueError (it would not verify)."""
    if signer.identity != manifest.hotkey:
        raise ValueError(f"signer {signer.identity} is not the manifest hotkey {manifest.hotkey}")
    return SignedManifest(manifest, signer.sign(manifest.signing_message()))


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Outcome of a check: ok, or the first failing check's code (one of CODES) and why."""

    ok: bool
    code: str
    reason: str

    def __post_init__(self):
        assert self.code in CODES, self.code
        assert self.ok == (self.code == "ok"), (self.ok, self.code)


OK = Verdict(True, "ok", "")


def _reject(code: str, reason: str) -> Verdict:
    return Verdict(False, code, reason)


def _first_failure(checks) -> Verdict:
    """Run checks (callables returning a Verdict or None) in order; the first failure wins."""
    for check in checks:
        failure = check()
        if failure is not None:
            return failure
    return OK


def _differs(code: str, name: str, got, want) -> Verdict | None:
    return None if got == want else _reject(code, f"{name} is {got!r}, expected {want!r}")


def _signature(signed: SignedManifest) -> Verdict | None:
    if signed.verify():
        return None
    return _reject("bad_signature", f"signature is not by hotkey {signed.manifest.hotkey}")


def _registered(m: Manifest, registered_hotkeys: Iterable[str]) -> Verdict | None:
    if normalise(m.hotkey) in {normalise(h) for h in registered_hotkeys}:
        return None
    return _reject("unregistered", f"hotkey {m.hotkey} is not registered")


def _committer(m: Manifest, commitment: Commitment) -> Verdict | None:
    if normalise(commitment.hotkey) == normalise(m.hotkey):
        return None
    return _reject("not_committer", f"committed by {commitment.hotkey}, manifest of {m.hotkey}")


def _digest(actual: str, commitment: Commitment) -> Verdict | None:
    return _differs("digest_mismatch", "committed digest", commitment.digest.lower(), actual)


def _in_time(commitment: Commitment, deadline_block: int) -> Verdict | None:
    if commitment.block <= deadline_block:
        return None
    return _reject("late", f"committed in block {commitment.block}, after {deadline_block}")


def _size(m: Manifest, max_artifact_bytes: int) -> Verdict | None:
    if m.artifact_size <= max_artifact_bytes:
        return None
    return _reject("too_large", f"artifact is {m.artifact_size} bytes, cap {max_artifact_bytes}")


def check_manifest(
    signed: SignedManifest | str | bytes,
    *,
    commitment: Commitment,
    expected_chain: str,
    expected_round: int,
    expected_task_id: int,
    expected_base_hash: str,
    expected_assignment_hash: str,
    registered_hotkeys: Iterable[str],
    deadline_block: int,
    max_artifact_bytes: int,
) -> Verdict:
    """Whether a validator should fetch and score the artifact this manifest names.

    Checks, first failure wins: parses (JSON given) -> signature by manifest.hotkey -> hotkey
    registered -> the commitment is that hotkey's -> its digest is the sha256 of these exact
    manifest bytes (JSON given) or of to_json() (SignedManifest given) -> it landed
    by deadline_block -> chain, round (manifest and commitment), task, base, assignment are the
    expected ones -> artifact_size <= max_artifact_bytes. The bytes themselves are checked
    against artifact_sha256/artifact_size when fetched (protocol.storage).
    """
    if not isinstance(signed, SignedManifest):
        raw = signed.encode() if isinstance(signed, str) else bytes(signed)
        try:
            signed = SignedManifest.from_json(raw)
        except ValueError as e:
            return _reject("malformed", str(e))
        actual_digest = hashlib.sha256(raw).hexdigest()  # the exact bytes received
    else:
        actual_digest = signed.commitment_digest()
    m = signed.manifest
    return _first_failure(
        (
            lambda: _signature(signed),
            lambda: _registered(m, registered_hotkeys),
            lambda: _committer(m, commitment),
            lambda: _digest(actual_digest, commitment),
            lambda: _in_time(commitment, deadline_block),
            lambda: _differs("wrong_chain", "chain", m.chain, expected_chain),
            lambda: _differs("wrong_round", "round", m.round, expected_round),
            lambda: _differs("wrong_round", "commitment round", commitment.round, expected_round),
            lambda: _differs("wrong_task", "task_id", m.task_id, expected_task_id),
            lambda: _differs("wrong_base", "base_hash", m.base_hash, expected_base_hash),
            lambda: _differs(
                "wrong_assignment", "assignment_hash", m.assignment_hash, expected_assignment_hash
            ),
            lambda: _size(m, max_artifact_bytes),
        )
    )


def delta_matches_manifest(meta: DeltaMeta, manifest: Manifest) -> Verdict:
    """Whether a fetched delta's own metadata agrees with the signed manifest's claims, and
    declares the shard of the manifest's task, hotkey and round."""
    return _first_failure(
        (
            lambda: _differs("wrong_round", "delta round", meta.round, manifest.round),
            lambda: _differs("wrong_base", "delta base_hash", meta.base_hash, manifest.base_hash),
            lambda: _differs(
                "wrong_assignment",
                "delta assignment_hash",
                meta.assignment_hash,
                manifest.assignment_hash,
            ),
            lambda: _differs("wrong_encoding", "delta encoding", meta.encoding, manifest.encoding),
            lambda: _differs("wrong_tokens", "delta tokens", meta.tokens, manifest.tokens),
            lambda: _differs(
                "wrong_shard",
                "delta shard",
                meta.shard,
                shard_key(manifest.task_id, manifest.hotkey, manifest.round),
            ),
        )
    )
