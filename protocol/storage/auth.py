"""Signed writes for the blob server: who may upload or delete, proven per request.

The client signs `moesaic-store-v1\\nMETHOD\\nPATH\\nSHA256\\nSIZE\\nTIMESTAMP` with either an
Ethereum key (EIP-191 personal message, eth-account) or a Bittensor/substrate sr25519 key
(substrate-interface), and sends the signer's identity (0x address or ss58), the timestamp and
the signature as headers. The server accepts a request only if the identity is on its
allow-list, the timestamp is within MAX_SKEW_S of its clock and the signature verifies. Reads
are public: objects are content-addressed, so a reader verifies what it gets anyway. The keys
and signature schemes themselves live in protocol.identity.keys.

A captured signature could be replayed within the skew window, but only for the same method,
path, digest and size: re-uploading identical bytes or re-deleting, both idempotent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path

# The key primitives live in protocol.identity.keys (manifests sign with them too); re-exported here so
# `from protocol.storage.auth import load_signer` keeps working.
from protocol.identity.keys import (
    ETH_ADDRESS_RE,
    EthSigner,
    Signer,
    Sr25519Signer,
    load_signer,
    normalise,
    verify_signature,
)

__all__ = [
    "DOMAIN",
    "ETH_ADDRESS_RE",
    "H_CHECK",
    "H_SIGNATURE",
    "H_SIGNER",
    "H_SIZE",
    "H_TIMESTAMP",
    "MAX_SKEW_S",
    "AllowList",
    "Denied",
    "EthSigner",
    "Signer",
    "Sr25519Signer",
    "check_request",
    "load_signer",
    "normalise",
    "request_message",
    "signed_headers",
    "verify_signature",
]

DOMAIN = "moesaic-store-v1"
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
MAX_SKEW_S = 300
H_SIGNER = "x-moesaic-signer"
H_TIMESTAMP = "x-moesaic-timestamp"
H_SIGNATURE = "x-moesaic-signature"
H_SIZE = "x-moesaic-size"  # the declared (and signed) body size of a PUT
H_CHECK = "x-moesaic-check"  # a PUT preflight: verify the headers, store nothing


def request_message(method: str, path: str, sha256: str, size: int, timestamp: int) -> bytes:
    """The exact bytes both sides sign and verify."""
    return "\n".join(
        [DOMAIN, method.upper(), path, sha256, str(int(size)), str(int(timestamp))]
    ).encode()


def signed_headers(
    signer: Signer, method: str, path: str, sha256: str, size: int, now: float | None = None
) -> dict[str, str]:
    """Headers proving `signer` asked for this request now."""
    ts = int(time.time() if now is None else now)
    sig = signer.sign(request_message(method, path, sha256, size, ts))
    return {H_SIGNER: signer.identity, H_TIMESTAMP: str(ts), H_SIGNATURE: sig, H_SIZE: str(size)}


class AllowList:
    """Identities allowed to write. From a file (re-read when it changes) and/or a list.

    File format: one 0x address or ss58 per line; `#` starts a comment.
    """

    def __init__(self, identities: Iterable[str] = (), path: str | Path | None = None):
        self._static = {normalise(i) for i in identities}
        self._path = Path(path) if path else None
        self._mtime: float | None = None
        self._from_file: set[str] = set()
        if self._path and not self._path.is_file():
            raise FileNotFoundError(f"allow-list {self._path} not found")

    def _refresh(self) -> None:
        # Registered hotkeys change while the server runs: re-read on change, one stat a request.
        if self._path is None:
            return
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            lines = self._path.read_text().splitlines()
            self._from_file = {normalise(x.split("#")[0]) for x in lines if x.split("#")[0].strip()}
            self._mtime = mtime

    def __contains__(self, identity: str) -> bool:
        self._refresh()
        key = normalise(identity)
        return key in self._static or key in self._from_file


class Denied(Exception):
    """A write refused: HTTP status (401 unauthenticated, 403 not allowed) and reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


def check_request(
    allow: AllowList | None,
    method: str,
    path: str,
    sha256: str,
    size: int,
    headers,
    *,
    now: float | None = None,
    max_skew_s: int = MAX_SKEW_S,
) -> str:
    """The verified signer of a write request, or Denied. `headers` is any case-insensitive map."""
    identity, ts, sig = headers.get(H_SIGNER), headers.get(H_TIMESTAMP), headers.get(H_SIGNATURE)
    if not (identity and ts and sig):
        raise Denied(401, "unsigned request: send x-moesaic-signer, -timestamp and -signature")
    if allow is None:
        raise Denied(403, "this server has no allow-list: it is read-only")
    # ASCII digits only, and few: "²".isdigit() is True and int() of it raises (a 500).
    if (
        not _TIMESTAMP_RE.fullmatch(ts)
        or abs((time.time() if now is None else now) - int(ts)) > max_skew_s
    ):
        raise Denied(401, f"timestamp {ts!r} is not within {max_skew_s} s of the server clock")
    if identity not in allow:
        raise Denied(403, f"signer {identity} is not on the allow-list")
    if not verify_signature(identity, request_message(method, path, sha256, size, int(ts)), sig):
        raise Denied(401, f"bad signature for signer {identity}")
    return identity
