"""Any S3-compatible store (AWS, R2, moto, s3rver, ...) through boto3: objects at PREFIX/<sha256>.

    S3Store.from_uri("s3://bucket/deltas?endpoint=http://127.0.0.1:9000&region=us-east-1",
                     access_key="...", secret_key="...")

Uploads of more than one part use multipart upload: each part (part_size, 8 MiB by default,
at least S3's 5 MiB) is read once, hashed and sent, so memory is one part and the digest the
object is stored under is the digest of the bytes actually sent. Downloads go through the
shared verified download (ranged GETs, resume). presign() gives a plain HTTPS link a reader
without credentials can fetch.

botocore's own retries are switched off: transfer.retry is the one retry policy. Request
checksums are "when required" only, because the newer default (aws-chunked bodies with CRC
trailers) is not understood by every S3-compatible server; integrity is our sha256 anyway.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from protocol.storage import ObjectRef, StorageError
from protocol.storage.transfer import (
    CHUNK,
    DEFAULT_RETRY,
    RetryPolicy,
    check_range_args,
    check_sha256,
    download,
    hash_file,
    progress_bar,
    resolve,
    retry,
    with_name,
)

log = logging.getLogger(__name__)
MIN_PART = 5 << 20  # S3's minimum for every part but the last
DEFAULT_PART = 8 << 20
_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _s3_error(exc, uri: str) -> StorageError:
    """A botocore ClientError as a StorageError with our code."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in _MISSING:
        return StorageError("missing", uri, "no such object")
    if code in _DENIED:
        return StorageError("denied", uri, f"S3 refused: {code}")
    return StorageError("bad_request", uri, f"S3 error {code}: {exc}")


class S3Store:
    """A Store on one bucket and key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        part_size: int = DEFAULT_PART,
        retry: RetryPolicy = DEFAULT_RETRY,
        client=None,
    ):
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be >= {MIN_PART} bytes (S3's minimum part)")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.part_size, self.retry = part_size, retry
        # Readable uris (s3://b/p?endpoint=http://host:port): ':' and '/' need no escaping there.
        query = f"?{urlencode({'endpoint': endpoint}, safe=':/')}" if endpoint else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/") + query
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    @classmethod
    def from_uri(cls, uri: str, **options) -> S3Store:
        """s3://bucket/prefix?endpoint=URL&region=R (credentials come as options or from env)."""
        parts = urlsplit(uri)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ValueError(
                f"unknown s3 uri parameters {sorted(unknown)} (credentials go in options)"
            )
        if not parts.netloc:
            raise ValueError(f"{uri!r}: expected s3://BUCKET[/PREFIX][?endpoint=URL]")
        return cls(parts.netloc, parts.path, **{**query, **options})

    def key(self, sha256: str) -> str:
        sha = check_sha256(sha256)
        return f"{self.prefix}/{sha}" if self.prefix else sha

    def object_uri(self, sha256: str) -> str:
        base, _, query = self.uri.partition("?")
        return f"{base}/{check_sha256(sha256)}" + (f"?{query}" if query else "")

    def _call(self, sha: str, what: str, fn):
        """fn() with transient failures retried and S3's refusals mapped to StorageError."""
        uri = self.object_uri(sha)
        try:
            return retry(fn, uri=uri, what=what, policy=self.retry)
        except ClientError as exc:
            raise _s3_error(exc, uri) from exc

    def _op(self, sha: str, what: str, op: str, **kwargs):
        """One client call on this bucket, through _call."""
        return self._call(sha, what, lambda: getattr(self.client, op)(Bucket=self.bucket, **kwargs))

    def put(
        self, path: str | Path, *, name: str | None = None, progress: bool = False
    ) -> ObjectRef:
        sha, size = hash_file(path, progress=progress)
        ref = ObjectRef(sha, size, with_name(self.object_uri(sha), name))
        if self.exists(sha):
            return ref
        meta = {"sha256": sha, **({"name": name} if name else {})}
        with open(path, "rb") as f, progress_bar(size, f"put {Path(path).name}", progress) as bar:
            if size <= self.part_size:
                data = f.read()
                if hashlib.sha256(data).hexdigest() != sha:
                    raise StorageError(
                        "digest_mismatch", ref.uri, f"{path} changed while uploading"
                    )
                self._op(sha, "PUT", "put_object", Key=self.key(sha), Body=data, Metadata=meta)
                bar.update(size)
            else:
                self._multipart(f, sha, meta, bar)
        return ref

    def _multipart(self, f, sha: str, meta: dict, bar) -> None:
        """Upload in parts, hashing as we go; abort unless the bytes sent hash to sha."""
        key = self.key(sha)
        upload_id = self._op(
            sha, "start multipart", "create_multipart_upload", Key=key, Metadata=meta
        )["UploadId"]
        try:
            h, parts = hashlib.sha256(), []
            while data := f.read(self.part_size):
                h.update(data)
                n = len(parts) + 1
                resp = self._op(
                    sha,
                    f"part {n}",
                    "upload_part",
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=n,
                    Body=data,
                )
                parts.append({"PartNumber": n, "ETag": resp["ETag"]})
                bar.update(len(data))
            if h.hexdigest() != sha:
                raise StorageError(
                    "digest_mismatch", self.object_uri(sha), "file changed while uploading"
                )
            self._op(
                sha,
                "complete multipart",
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # An abandoned upload keeps its parts (and costs storage) until aborted.
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception as exc:  # do not mask the original failure
                log.warning("could not abort multipart upload %s of %s: %s", upload_id, key, exc)
            raise

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

        def size_of() -> int:
            return int(self._op(sha, "HEAD", "head_object", Key=self.key(sha))["ContentLength"])

        @contextmanager
        def open_stream(pos: int):
            ranged = {"Range": f"bytes={pos}-"} if pos else {}
            body = self._op(sha, "GET", "get_object", Key=self.key(sha), **ranged)["Body"]
            try:
                yield body.iter_chunks(CHUNK)
            finally:
                body.close()

        return download(
            sha256=sha,
            uri=self.object_uri(sha),
            dest_path=dest_path,
            expected_sha256=expected_sha256,
            max_bytes=max_bytes,
            size_of=size_of,
            open_stream=open_stream,
            progress=progress,
            resume=resume,
            policy=self.retry,
        )

    def read_range(self, uri_or_ref, start: int, length: int) -> bytes:
        check_range_args(start, length)
        sha = resolve(uri_or_ref, self.uri)
        size = int(self._op(sha, "HEAD", "head_object", Key=self.key(sha))["ContentLength"])
        if length == 0 or start >= size:  # S3 answers 416 there; the contract is b""
            return b""
        rng = f"bytes={start}-{min(start + length, size) - 1}"

        def fetch() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(sha), Range=rng)
            return resp["Body"].read()

        return self._call(sha, "GET range", fetch)

    def exists(self, sha256: str) -> bool:
        try:
            self._op(sha256, "HEAD", "head_object", Key=self.key(sha256))
        except StorageError as e:
            if e.code == "missing":
                return False
            raise
        return True

    def delete(self, sha256: str) -> None:
        self._op(sha256, "DELETE", "delete_object", Key=self.key(sha256))

    def list(self):
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
        )
        for page in pages:
            for obj in page.get("Contents", []):
                sha = obj["Key"].rpartition("/")[2]
                if len(sha) == 64:
                    yield sha

    def presign(self, sha256: str, expires: int = 3600) -> str:
        """A GET url anyone can use for `expires` seconds (no credentials on the reader)."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(sha256)}, ExpiresIn=expires
        )
