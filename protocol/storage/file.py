"""A content-addressed directory: ROOT/objects/<sha[:2]>/<sha>, written atomically.

Used directly (a shared filesystem, unit tests, a local cache) and as the on-disk layout of the
blob server (server.py). Writes go to ROOT/tmp on the same filesystem, are fsynced and renamed
into place, so a reader sees a complete object or none, and a crash leaves only temp files.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from protocol.storage import ObjectRef, StorageError
from protocol.storage.transfer import (
    DEFAULT_RETRY,
    RetryPolicy,
    check_range_args,
    check_sha256,
    download,
    fsync_dir,
    iter_file,
    progress_bar,
    resolve,
    with_name,
)


class FileStore:
    """Objects as files under root; every method streams."""

    def __init__(self, root: str | Path, *, retry: RetryPolicy = DEFAULT_RETRY):
        self.root = Path(root).resolve()
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(exist_ok=True)
        self.uri = self.root.as_uri()
        self.retry = retry

    @classmethod
    def from_uri(cls, uri: str, **options) -> FileStore:
        """file:///abs/dir, or a plain path."""
        path = unquote(urlsplit(uri).path) if uri.startswith("file://") else uri
        return cls(path, **options)

    # -- layout, shared with the blob server ----------------------------------------------
    def object_path(self, sha256: str) -> Path:
        sha = check_sha256(sha256)
        return self.root / "objects" / sha[:2] / sha

    def object_uri(self, sha256: str) -> str:
        return self.object_path(sha256).as_uri()

    def temp_file(self) -> tuple[int, Path]:
        """An open descriptor and path for a new object being written (same filesystem)."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="put-", suffix=".tmp")
        return fd, Path(name)

    def install(self, tmp: Path, sha256: str) -> Path:
        """Rename a complete, fsynced temp file to its object path (idempotent)."""
        dest = self.object_path(sha256)
        dest.parent.mkdir(exist_ok=True)
        os.replace(tmp, dest)  # same bytes if it already existed: replacing is harmless
        fsync_dir(dest.parent)
        return dest

    def size(self, sha256: str) -> int:
        try:
            return self.object_path(sha256).stat().st_size
        except FileNotFoundError:
            raise StorageError("missing", self.object_uri(sha256), "no such object") from None

    # -- Store ----------------------------------------------------------------------------
    def put(
        self, path: str | Path, *, name: str | None = None, progress: bool = False
    ) -> ObjectRef:
        """Copy into the store while hashing: one read of the source."""
        src = Path(path)
        total = src.stat().st_size
        fd, tmp = self.temp_file()
        h, size = hashlib.sha256(), 0
        try:
            with (
                os.fdopen(fd, "wb") as out,
                progress_bar(total, f"put {src.name}", progress) as bar,
            ):
                for chunk in iter_file(src):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            sha = h.hexdigest()
            if self.object_path(sha).exists():
                tmp.unlink()
            else:
                self.install(tmp, sha)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return ObjectRef(sha, size, with_name(self.object_uri(sha), name))

    def get(
        self,
        uri_or_ref,
        dest_path,
        *,
        expected_sha256: str,
        max_bytes: int,
        progress: bool = False,
        resume: bool = True,
    ) -> Path:
        sha = resolve(uri_or_ref, self.uri)
        uri = self.object_uri(sha)

        @contextmanager
        def open_stream(pos: int):
            try:
                yield iter_file(self.object_path(sha), pos)
            except FileNotFoundError:
                raise StorageError("missing", uri, "object deleted during download") from None

        return download(
            sha256=sha,
            uri=uri,
            dest_path=dest_path,
            expected_sha256=expected_sha256,
            max_bytes=max_bytes,
            size_of=lambda: self.size(sha),
            open_stream=open_stream,
            progress=progress,
            resume=resume,
            policy=self.retry,
        )

    def read_range(self, uri_or_ref, start: int, length: int) -> bytes:
        check_range_args(start, length)
        sha = resolve(uri_or_ref, self.uri)
        try:
            with self.object_path(sha).open("rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise StorageError("missing", self.object_uri(sha), "no such object") from None

    def exists(self, sha256: str) -> bool:
        return self.object_path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        self.object_path(sha256).unlink(missing_ok=True)

    def list(self, after: str = "") -> Iterator[str]:
        """Digests in sorted order, starting after `after` (a cursor for paging)."""
        objects = self.root / "objects"
        for prefix in sorted(p.name for p in objects.iterdir() if p.is_dir()):
            if prefix < after[:2]:
                continue
            for sha in sorted(p.name for p in (objects / prefix).iterdir()):
                if sha > after and len(sha) == 64:
                    yield sha
