"""What every backend shares: the retry policy, uri resolution, hashing and the verified download.

`download` is the only code that writes a downloaded object: backends give it two callables
(the object's size, and a byte stream from an offset) and it owns the .part file, the resume,
the size cap, the digest check and the atomic rename. `retry` is the only place that decides
what is transient and how long to wait.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit

from tqdm import tqdm

from protocol.storage import READ_RANGE_MAX, SHA256_RE, ObjectRef, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to be irrelevant in RSS


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max_delay, base_delay * 2**i) * U(0.5, 1)."""

    attempts: int = 5  # total tries, the first included
    base_delay: float = 0.25  # seconds before the second try
    max_delay: float = 8.0  # cap on one wait


DEFAULT_RETRY = RetryPolicy()
_BOTO_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, truncated streams and 5xx: worth another try.

    httpx and botocore are looked up in sys.modules rather than imported: if a library is not
    loaded, none of its exceptions can be in flight.
    """
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return True
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None:
        if isinstance(exc, boto.HTTPClientError | boto.ConnectionError | boto.IncompleteReadError):
            return True
        if isinstance(exc, boto.ClientError):
            err = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or err.get("Code") in _BOTO_TRANSIENT_CODES
    return False


def retry(
    fn: Callable[[], T],
    *,
    uri: str,
    what: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn until it succeeds, retrying transient failures with backoff.

    A non-transient exception propagates at once. When the attempts run out, the last
    transient failure becomes StorageError("unavailable") naming the uri and the cause.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == policy.attempts - 1:
                raise StorageError(
                    "unavailable",
                    uri,
                    f"{what} failed after {policy.attempts} attempts: {type(exc).__name__}: {exc}",
                ) from exc
            delay = min(policy.max_delay, policy.base_delay * 2**attempt) * random.uniform(0.5, 1)
            log.warning("%s %s: %s; retrying in %.2f s", what, uri, exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def check_sha256(sha256: str) -> str:
    """The digest as 64 lowercase hex chars, or ValueError."""
    value = str(sha256).lower()
    if not SHA256_RE.fullmatch(value):
        raise ValueError(f"not a sha256 (64 hex chars): {sha256!r}")
    return value


def check_range_args(start: int, length: int) -> None:
    """read_range arguments: a non-negative start and a length within READ_RANGE_MAX."""
    if start < 0 or length < 0:
        raise ValueError(f"read_range needs start >= 0 and length >= 0, got {start}, {length}")
    if length > READ_RANGE_MAX:
        raise ValueError(f"read_range is for small reads (<= {READ_RANGE_MAX} bytes); use get")


def resolve(uri_or_ref: str | ObjectRef, base_uri: str) -> str:
    """The sha256 an ObjectRef, a bare digest or an object uri of the store at base_uri names.

    The query and #name fragment are ignored; an object uri of another store is a ValueError,
    so a store never reads from a location it was not opened on.
    """
    uri = uri_or_ref.uri if isinstance(uri_or_ref, ObjectRef) else str(uri_or_ref)
    if SHA256_RE.fullmatch(uri.lower()):
        return uri.lower()
    obj, base = urlsplit(uri), urlsplit(base_uri)
    sha = obj.path.rpartition("/")[2]
    same_store = (obj.scheme, obj.netloc) == (base.scheme, base.netloc) and obj.path.startswith(
        base.path.rstrip("/") + "/"
    )
    if not same_store or not SHA256_RE.fullmatch(sha):
        raise ValueError(f"{uri!r} is not an object of the store at {base_uri!r}")
    return sha


def with_name(uri: str, name: str | None) -> str:
    """The object uri with its human label as a #fragment (never sent to a server)."""
    return f"{uri}#{quote(name, safe='')}" if name else uri


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """A tqdm byte counter (KiB/MiB/GiB), or a silent one."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        leave=False,
    )


def hash_file(path: str | Path, *, progress: bool = False) -> tuple[str, int]:
    """(sha256, size) of a file, streamed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    h, size = hashlib.sha256(), 0
    with (
        path.open("rb") as f,
        progress_bar(path.stat().st_size, f"hash {path.name}", progress) as bar,
    ):
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return h.hexdigest(), size


def iter_file(path: str | Path, start: int = 0, end: int | None = None, chunk: int = CHUNK):
    """The bytes of path from start to end (exclusive; None = EOF), in chunks."""
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            data = f.read(chunk if left is None else min(chunk, left))
            if not data:
                return
            if left is not None:
                left -= len(data)
            yield data


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Opener = Callable[[int], AbstractContextManager[Iterable[bytes]]]


def download(
    *,
    uri: str,
    sha256: str,
    dest_path: str | Path,
    expected_sha256: str,
    max_bytes: int,
    size_of: Callable[[], int],
    open_stream: Opener,
    progress: bool = False,
    resume: bool = True,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> Path:
    """Stream an object to dest_path + ".part", verify it, then rename it to dest_path.

    sha256 is the digest the uri names; if it differs from expected_sha256 nothing is fetched.
    size_of() returns the object's size (or raises StorageError "missing"); open_stream(pos)
    yields its bytes from offset pos. An existing .part is continued (its bytes are re-hashed,
    not trusted: a wrong prefix costs one full download, then the digest decides). The .part is
    locked, so two downloads to one dest fail fast ("busy") instead of interleaving. On
    "unavailable" the .part is kept for the next call to resume; on any other StorageError it
    is deleted and dest is never created.
    """
    expected = check_sha256(expected_sha256)
    if sha256 != expected:  # a content-addressed uri already says what it will deliver
        raise StorageError("digest_mismatch", uri, f"the uri names {sha256}, expected {expected}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError("busy", uri, f"{part} is being written by another process") from None
        try:
            size = retry(size_of, uri=uri, what="stat", policy=policy)
            if size > max_bytes:
                raise StorageError("too_large", uri, f"object is {size} bytes, cap is {max_bytes}")
            job = _Receive(f, open_stream, uri, size, expected, dest.name, progress, policy)
            job.run(resume)
        except StorageError as e:
            # Keep received bytes only where a later call can resume from them.
            if e.code != "unavailable" or f.seek(0, os.SEEK_END) == 0:
                part.unlink(missing_ok=True)
            raise
        f.flush()
        os.fsync(f.fileno())
        os.replace(part, dest)
    fsync_dir(dest.parent)
    return dest


@dataclass
class _Receive:
    """One verified download into an open, locked .part file."""

    f: object
    open_stream: Opener
    uri: str
    size: int
    expected: str
    label: str
    progress: bool
    policy: RetryPolicy

    def run(self, resume: bool) -> None:
        offset = self.f.seek(0, os.SEEK_END) if resume else 0
        if offset > self.size:
            offset = 0  # not a prefix of this object
        self.f.truncate(offset)
        self.h = hashlib.sha256()
        self.f.seek(0)
        while self.f.tell() < offset:
            self.h.update(self.f.read(min(CHUNK, offset - self.f.tell())))
        if offset:
            log.info("%s: resuming at byte %d of %d", self.uri, offset, self.size)
        with progress_bar(self.size, self.label, self.progress, initial=offset) as self.bar:
            while self.f.tell() < self.size:
                retry(self._stream, uri=self.uri, what="download", policy=self.policy)
        digest = self.h.hexdigest()
        if digest == self.expected:
            return
        if offset:
            log.warning("%s: digest mismatch after resuming; downloading from byte 0", self.uri)
            return self.run(resume=False)
        raise StorageError(
            "digest_mismatch",
            self.uri,
            f"received {self.size} bytes with sha256 {digest}, expected {self.expected}",
        )

    def _stream(self) -> None:
        """Append from the current offset; an interruption after progress resumes at once."""
        start = self.f.tell()
        try:
            with self.open_stream(start) as chunks:
                for chunk in chunks:
                    if self.f.tell() + len(chunk) > self.size:
                        raise StorageError(
                            "too_large", self.uri, f"sent more than the {self.size} bytes declared"
                        )
                    self.f.write(chunk)
                    self.h.update(chunk)
                    self.bar.update(len(chunk))
            if self.f.tell() < self.size:
                raise StorageError(
                    "unavailable",
                    self.uri,
                    f"stream ended at byte {self.f.tell()} of {self.size}",
                    transient=True,
                )
        except Exception as exc:
            if self.f.tell() > start and is_transient(exc):
                # Progress was made: continue from here with a fresh retry budget, so a long
                # transfer survives any number of spaced-out resets.
                log.warning(
                    "%s: interrupted at byte %d (%s); resuming", self.uri, self.f.tell(), exc
                )
                return
            raise
