"""Fetching one miner's submission: its signed manifest by the committed digest, then its delta.

    expect = Expectations(chain=..., task_id=0, base_hash=..., assignment_hash=...,
                          registered_hotkeys=[...], deadline_block=..., max_artifact_bytes=...)
    got = fetch_submission(store, commitment, expect, dest_dir=Path("state/artifacts/1"))
    if isinstance(got, Rejected): print(got.code, got.reason)
    else: read_delta_untrusted(got.artifact_path, expected_sha256=got.artifact_sha256, ...)

Shared by the validator (which scores what it fetched) and the merger (which merges the
accepted miners' deltas): both must fetch the same bytes under the same rules, or the merger
would compose something the validators never scored. Both objects come from the caller's
store by sha256, never from the uri a manifest names, so a miner cannot point anyone at hosts
of its choosing. A miner's failure is a `Rejected` value, never an exception. No torch here.

Miners commit first and upload (reveal) only after the commit deadline, so both roles fetch
after the reveal phase; an object the store does not have then was never revealed
(`not_revealed`), which is the miner's doing, while `unavailable` stays for transfers that
failed or bytes that do not hash to the committed digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.chain import Commitment
from protocol.identity.hashing import sha256_file
from protocol.round.manifest import MAX_JSON_BYTES, SignedManifest, check_manifest
from protocol.storage import SHA256_RE, StorageError, Store

UNAVAILABLE = "unavailable"  # outcome code: the manifest or the artifact could not be fetched
NOT_REVEALED = "not_revealed"  # outcome code: the store has no such object after the reveal phase
MALFORMED = "malformed"  # outcome code: the committed digest is not a sha256 (manifest code too)
# Outcome code (check_manifest's too): the declared size is over the assignment's bound, or the
# store sent more bytes than the manifest declares (the transfer is cut off there).
TOO_LARGE = "too_large"
_SAFE_NAME = re.compile(r"[0-9A-Za-z]{1,64}")


@dataclass(frozen=True)
class Expectations:
    """What a round's submissions must match (the arguments of check_manifest but one)."""

    chain: str
    """Chain label the manifest must name (evm_chain(...) or subtensor_chain(...))."""
    task_id: int
    """Task the round belongs to."""
    base_hash: str
    """sha256_dir of the base the deltas were trained on."""
    assignment_hash: str
    """Hash of the expert assignment the deltas cover."""
    registered_hotkeys: Sequence[str]
    """Hotkeys registered now: a manifest signed by anyone else is refused."""
    deadline_block: int
    """Last block a commitment may have landed in."""
    max_artifact_bytes: int
    """Largest delta fetched (and the cap on the manifest's declared artifact_size): the
    largest well-formed delta for the assignment, max_delta_bytes(layout, assignment), under
    the operator's cap. Never the manifest's word: a miner declares what it likes."""
    max_manifest_bytes: int = MAX_JSON_BYTES
    """Largest signed manifest fetched."""


@dataclass(frozen=True)
class Fetched:
    """A verified submission on disk: the manifest bytes the digest names, and its artifact."""

    hotkey: str
    manifest_path: Path
    artifact_path: Path
    artifact_sha256: str
    size: int


@dataclass(frozen=True)
class Rejected:
    """Why a submission was not fetched: `code` is the outcome code (UNAVAILABLE, MALFORMED or
    a check_manifest code), `rejection` the precise cause (a storage or manifest code)."""

    hotkey: str
    code: str
    rejection: str
    reason: str


def file_name(hotkey: str) -> str:
    """A file name for a hotkey: itself when plainly alphanumeric, else a digest of it."""
    if _SAFE_NAME.fullmatch(hotkey):
        return hotkey
    return hashlib.sha256(hotkey.encode()).hexdigest()[:40]


def fetch_submission(
    store: Store, commitment: Commitment, expect: Expectations, *, dest_dir: str | Path
) -> Fetched | Rejected:
    """Fetch and check one commitment's manifest, then fetch the artifact it signs for.

    `commitment.hotkey` must be the registered spelling of the key and `commitment.round` the
    round expected. Files land in dest_dir as <name>.manifest.json and <name>.safetensors; a
    file already there with the right sha256 is kept (a restarted caller fetches nothing twice).
    """
    hotkey, digest, r = commitment.hotkey, commitment.digest, commitment.round
    folder, name = Path(dest_dir), file_name(hotkey)
    if not SHA256_RE.fullmatch(digest):
        return Rejected(hotkey, MALFORMED, MALFORMED, f"digest {digest!r} is no sha256")
    try:
        dest = folder / f"{name}.manifest.json"
        raw = _get(store, digest, dest, expect.max_manifest_bytes).read_bytes()
    except StorageError as e:
        return _not_fetched(hotkey, "manifest", e)
    verdict = check_manifest(
        raw,
        commitment=commitment,
        expected_chain=expect.chain,
        expected_round=r,
        expected_task_id=expect.task_id,
        expected_base_hash=expect.base_hash,
        expected_assignment_hash=expect.assignment_hash,
        registered_hotkeys=expect.registered_hotkeys,
        deadline_block=expect.deadline_block,
        max_artifact_bytes=expect.max_artifact_bytes,
    )
    if not verdict.ok:
        reason = f"manifest rejected ({verdict.code}): {verdict.reason}"
        return Rejected(hotkey, verdict.code, verdict.code, reason)
    m = SignedManifest.from_json(raw).manifest
    artifact = folder / f"{name}.safetensors"
    try:  # the declared size (<= the expected cap, checked above) bounds the transfer
        path = _get(
            store, m.artifact_sha256, artifact, min(m.artifact_size, expect.max_artifact_bytes)
        )
    except StorageError as e:
        if e.code != "busy":  # (busy: another process's download, not ours to remove)
            _remove(artifact)  # the manifest stays: the record of what was refused
        if e.code == TOO_LARGE:  # more bytes than signed for: cut off, and the miner's fault
            return Rejected(hotkey, TOO_LARGE, TOO_LARGE, f"artifact cut off: {e}")
        return _not_fetched(hotkey, "artifact", e)
    return Fetched(hotkey, dest, path, m.artifact_sha256, m.artifact_size)


def _remove(artifact: Path) -> None:
    """A refused artifact and any partial download of it: nothing of it stays on disk (the
    round's fetch is final, so a .part would never be resumed)."""
    artifact.unlink(missing_ok=True)
    artifact.with_name(artifact.name + ".part").unlink(missing_ok=True)


def _not_fetched(hotkey: str, what: str, e: StorageError) -> Rejected:
    """A missing object was never revealed (NOT_REVEALED); any other failure is UNAVAILABLE."""
    if e.code == "missing":
        reason = f"{what} not revealed by the end of the reveal phase ({e})"
        return Rejected(hotkey, NOT_REVEALED, e.code, reason)
    return Rejected(hotkey, UNAVAILABLE, e.code, f"{what} not fetched: {e}")


def _get(store: Store, sha256: str, dest: Path, max_bytes: int) -> Path:
    # A restarted run keeps what an earlier run verified; a .part left behind is resumed.
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    return Path(store.get(sha256, dest, expected_sha256=sha256, max_bytes=max_bytes))


__all__ = [
    "MALFORMED",
    "TOO_LARGE",
    "NOT_REVEALED",
    "UNAVAILABLE",
    "Expectations",
    "Fetched",
    "Rejected",
    "fetch_submission",
    "file_name",
]
