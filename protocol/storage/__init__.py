"""Verified, streaming storage for deltas and checkpoints: one small interface, real backends.

    from protocol.storage import open_store
    store = open_store("http://127.0.0.1:8765", signer=load_signer(key))   # or file:///dir,
    ref = store.put("runs/d0.safetensors", name="d0.safetensors")         # s3://bucket/prefix?..
    store.get(ref.uri, "in/d0.safetensors", expected_sha256=ref.sha256, max_bytes=8 << 30)

Backends (imported lazily, so this module stays light): `file` (a content-addressed directory,
file.py), `http` (our signed blob server: client http.py, server server.py), `s3` (any
S3-compatible store through boto3, s3.py). hf.py publishes whole checkpoint directories on the
Hugging Face Hub with a sha256 manifest; it is not a `Store`.

Contracts every backend keeps (tests/integration/test_storage_conformance.py runs the same
cases on all of them):
- objects are addressed by the sha256 of their exact bytes; `name` is only a label, carried
  as the uri's `#fragment`; putting the same bytes twice gives the same ObjectRef;
- nothing holds a whole object in memory: put and get stream in chunks (S3 parts are the one
  bounded buffer);
- get writes DEST.part, continues an existing .part with a byte range, checks the size cap
  and the sha256, and only then renames it to DEST; on a mismatch the .part is deleted and a
  StorageError says which uri and why;
- transient failures (connection reset, 5xx, timeouts) are retried with exponential backoff
  in one place, transfer.retry; everything else fails at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

SHA256_RE = re.compile(r"[0-9a-f]{64}")
READ_RANGE_MAX = 64 << 20  # read_range is for headers and probes; bigger reads should stream

# StorageError codes: what went wrong, for callers that branch on it.
CODES = (
    "missing",  # no object with that sha256
    "digest_mismatch",  # the bytes received (or sent) do not hash to the expected sha256
    "too_large",  # over the caller's max_bytes, the server's cap or the declared size
    "unavailable",  # transport failure or 5xx that outlived the retries
    "denied",  # upload or delete refused: unsigned, unknown signer, stale or bad signature,
    # or (delete) an object the signer never uploaded
    "over_quota",  # the upload would pass the signer's quota on the blob server
    "busy",  # another process is downloading to the same destination
    "bad_request",  # the backend refused the request for another reason
)


class StorageError(RuntimeError):
    """A storage operation failed: `code` (one of CODES), the `uri` involved and the cause."""

    def __init__(self, code: str, uri: str, message: str, *, transient: bool = False):
        assert code in CODES, code
        super().__init__(f"{code}: {uri}: {message}")
        self.code = code
        self.uri = uri
        self.message = message
        self.transient = transient  # worth retrying (transfer.retry reads this)


@dataclass(frozen=True)
class ObjectRef:
    """A stored object: the sha256 and size of its bytes and where to fetch them."""

    sha256: str  # 64 lowercase hex chars
    size: int  # bytes
    uri: str  # backend-specific; its path ends with the sha256; an optional #fragment is the name


@runtime_checkable
class Store(Protocol):
    """What every role needs from artifact storage."""

    def put(
        self, path: str | Path, *, name: str | None = None, progress: bool = False
    ) -> ObjectRef:
        """Upload a file (streamed, hashed) and return its ref; a no-op if already stored."""

    def get(
        self,
        uri_or_ref: str | ObjectRef,
        dest_path: str | Path,
        *,
        expected_sha256: str,
        max_bytes: int,
        progress: bool = False,
        resume: bool = True,
    ) -> Path:
        """Download to dest_path, verified against expected_sha256 and max_bytes first."""

    def read_range(self, uri_or_ref: str | ObjectRef, start: int, length: int) -> bytes:
        """Up to `length` bytes from offset `start` (b"" past the end), unverified: a probe."""

    def exists(self, sha256: str) -> bool:
        """Whether an object with this sha256 is stored."""

    def object_uri(self, sha256: str) -> str:
        """The uri an object with this sha256 has (or will have once put), without a name: a
        miner signs it in its manifest before it reveals (uploads) anything."""

    def delete(self, sha256: str) -> None:
        """Remove an object (no error if absent); signed on the http backend."""

    def list(self) -> Iterator[str]:
        """The sha256 of every stored object."""


def open_store(uri_or_config: str | Mapping[str, Any], **options: Any) -> Store:
    """A store from a uri, or from a mapping with "uri" plus backend options.

    - `file:///abs/dir` (or a plain directory path): FileStore;
    - `http://host:port`: HttpStore; pass `signer=` to upload or delete;
    - `s3://bucket/prefix?endpoint=http://host:port&region=...`: S3Store; credentials from
      `access_key=`/`secret_key=` options or the usual AWS environment.
    """
    if isinstance(uri_or_config, Mapping):
        config = dict(uri_or_config)
        uri = config.pop("uri")
        options = {**config, **options}
    else:
        uri = uri_or_config
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme == "file":
        from protocol.storage.file import FileStore  # noqa: PLC0415 (import cycle: the backends import this package)

        return FileStore.from_uri(uri, **options)
    if scheme in ("http", "https"):
        from protocol.storage.http import HttpStore  # noqa: PLC0415 (import cycle: the backends import this package)

        return HttpStore(uri, **options)
    if scheme == "s3":
        from protocol.storage.s3 import S3Store  # noqa: PLC0415 (import cycle: the backends import this package; s3 also loads boto3)

        return S3Store.from_uri(uri, **options)
    raise ValueError(f"unsupported store uri {uri!r}: use file://, http(s):// or s3://")


def store_uri_of(object_uri: str) -> str:
    """The store an object uri belongs to (what open_store needs to fetch it).

    file:///srv/store/objects/ab/SHA -> file:///srv/store; http://host/objects/SHA -> http://host;
    s3://bucket/prefix/SHA?endpoint=... -> s3://bucket/prefix?endpoint=...
    """
    parts = urlsplit(object_uri)
    head, _, sha = parts.path.rpartition("/")
    if not SHA256_RE.fullmatch(sha):
        raise ValueError(f"{object_uri!r} does not end with a sha256")
    if parts.scheme != "s3":
        if "/objects/" not in parts.path:
            raise ValueError(f"{object_uri!r} is not an object uri (no /objects/ in its path)")
        head = parts.path.rsplit("/objects/", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, head, parts.query, ""))


def fetch(
    object_uri: str,
    dest_path: str | Path,
    *,
    expected_sha256: str,
    max_bytes: int,
    progress: bool = False,
    resume: bool = True,
    **store_options: Any,
) -> Path:
    """Download any object uri (as committed on chain) from the store it names, verified."""
    store = open_store(store_uri_of(object_uri), **store_options)
    return store.get(
        object_uri,
        dest_path,
        expected_sha256=expected_sha256,
        max_bytes=max_bytes,
        progress=progress,
        resume=resume,
    )
