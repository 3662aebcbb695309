"""Fetch outcomes of protocol.round.submissions: what is never revealed is named apart from
what failed to transfer (a fake store; the real stores' codes: tests/integration).

.venv/bin/python -m pytest -q tests/unit/test_submissions.py
"""

from __future__ import annotations

import hashlib

import pytest

from protocol.chain import Commitment
from protocol.identity.keys import EthSigner
from protocol.round.manifest import Manifest, evm_chain, sign
from protocol.round.submissions import (
    NOT_REVEALED,
    UNAVAILABLE,
    Expectations,
    Rejected,
    fetch_submission,
)
from protocol.storage import StorageError

SIGNER = EthSigner("0x" + hashlib.sha256(b"submissions-unit").hexdigest())
CHAIN = evm_chain(31337, "0x" + "33" * 20)
BASE, ASSIGN, ART = "a" * 64, "b" * 64, "c" * 64
ROUND, DEADLINE = 2, 100


class Store:
    """Serves the objects it holds; any other sha256 fails with `failure` (a StorageError code)."""

    def __init__(self, objects: dict[str, bytes], failure: str = "missing"):
        self.objects, self.failure = objects, failure

    def get(self, sha256, dest, *, expected_sha256, max_bytes, **kwargs):
        if sha256 not in self.objects:
            message = "no such object" if self.failure == "missing" else "peer reset"
            raise StorageError(self.failure, f"mem://{sha256}", message)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.objects[sha256])
        return dest


def _signed() -> bytes:
    manifest = Manifest(
        chain=CHAIN, round=ROUND, task_id=0, base_hash=BASE, assignment_hash=ASSIGN,
        artifact_sha256=ART, artifact_size=1000, uri=f"mem://{ART}", hotkey=SIGNER.identity,
        tokens=10, encoding="bfloat16",
    )  # fmt: skip
    return sign(manifest, SIGNER).to_json().encode()


def _fetch(store, digest: str, tmp_path):
    expect = Expectations(
        chain=CHAIN, task_id=0, base_hash=BASE, assignment_hash=ASSIGN,
        registered_hotkeys=[SIGNER.identity], deadline_block=DEADLINE, max_artifact_bytes=1 << 20,
    )  # fmt: skip
    commitment = Commitment(SIGNER.identity, ROUND, digest, DEADLINE - 1)
    return fetch_submission(store, commitment, expect, dest_dir=tmp_path / "in")


@pytest.mark.parametrize(
    ("failure", "code"),
    [("missing", NOT_REVEALED), ("unavailable", UNAVAILABLE), ("digest_mismatch", UNAVAILABLE)],
)
def test_a_missing_object_is_not_revealed_a_failed_transfer_unavailable(failure, code, tmp_path):
    raw = _signed()
    digest = hashlib.sha256(raw).hexdigest()
    # The manifest itself.
    got = _fetch(Store({}, failure), digest, tmp_path / "manifest")
    assert isinstance(got, Rejected) and (got.code, got.rejection) == (code, failure)
    verb = "not revealed" if code == NOT_REVEALED else "not fetched"
    assert got.reason.startswith(f"manifest {verb}")
    # The manifest is there, the delta it signs for is not.
    got = _fetch(Store({digest: raw}, failure), digest, tmp_path / "artifact")
    assert isinstance(got, Rejected) and (got.code, got.rejection) == (code, failure)
    assert got.reason.startswith(f"artifact {verb}") and ART in got.reason
