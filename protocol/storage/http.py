"""Client for the blob server (server.py): signed streaming uploads, ranged resumable downloads.

Object uris are `BASE/objects/<sha256>[#name]`. Reads need no key; put and delete need a
`signer` (auth.load_signer) whose identity is on the server's allow-list.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import httpx

from protocol.storage import ObjectRef, StorageError
from protocol.storage.auth import H_CHECK, Signer, signed_headers
from protocol.storage.transfer import (
    CHUNK,
    DEFAULT_RETRY,
    RetryPolicy,
    check_range_args,
    check_sha256,
    download,
    hash_file,
    iter_file,
    progress_bar,
    resolve,
    retry,
    with_name,
)

_STATUS_CODES = {
    401: "denied",
    403: "denied",
    404: "missing",
    413: "too_large",
    422: "digest_mismatch",
}


def raise_for_status(resp: httpx.Response, uri: str) -> None:
    """A non-2xx response as a StorageError; 5xx and 429 are transient (worth a retry)."""
    if resp.is_success:
        return
    error = None
    try:
        resp.read()  # a streamed error response: its small JSON body says why
        error = resp.json().get("error")
        message = resp.json().get("message") or resp.text
    except Exception:  # not our JSON error body (a proxy's page, a HEAD without a body)
        message = resp.reason_phrase
    status = resp.status_code
    transient = status >= 500 or status == 429
    code = "unavailable" if transient else _STATUS_CODES.get(status, "bad_request")
    if status == 413 and error == "over_quota":
        code = "over_quota"
    raise StorageError(code, uri, f"HTTP {status}: {message}", transient=transient)


class HttpStore:
    """A Store on a blob server at base_url."""

    def __init__(
        self,
        base_url: str,
        *,
        signer: Signer | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.BaseTransport | None = None,
    ):
        self.uri = base_url.rstrip("/")
        self.signer = signer
        self.retry = retry
        # Connecting fails fast; a read or write may wait `timeout` s on a busy disk at the far end.
        timeouts = httpx.Timeout(timeout, connect=10.0)
        # Identity encoding: we hash and resume on the exact stored bytes, so no gzip in between.
        self.client = httpx.Client(
            timeout=timeouts,
            transport=transport,
            follow_redirects=False,
            headers={"accept-encoding": "identity"},
        )

    def close(self) -> None:
        self.client.close()

    def object_uri(self, sha256: str) -> str:
        return f"{self.uri}/objects/{check_sha256(sha256)}"

    def _call(self, uri: str, what: str, fn):
        return retry(fn, uri=uri, what=what, policy=self.retry)

    def _head(self, sha: str) -> httpx.Response:
        """HEAD with 5xx retried; a 404 is an answer, not an error."""
        uri = self.object_uri(sha)

        def call() -> httpx.Response:
            resp = self.client.head(uri)
            if resp.status_code != 404:
                raise_for_status(resp, uri)
            return resp

        return self._call(uri, "HEAD", call)

    def _signed(self, method: str, sha: str, size: int) -> dict[str, str]:
        if self.signer is None:
            raise ValueError(
                "uploading or deleting needs a signer (a key on the server's allow-list)"
            )
        path = httpx.URL(self.object_uri(sha)).path
        return signed_headers(self.signer, method, path, sha, size)

    def put(
        self, path: str | Path, *, name: str | None = None, progress: bool = False
    ) -> ObjectRef:
        """Hash, preflight (auth, cap, already stored?), then stream the file.

        The server re-hashes the body and refuses it unless it matches, so a file that changes
        while uploading is rejected there ("digest_mismatch"), never stored under a wrong name.
        """
        sha, size = hash_file(path, progress=progress)
        uri = self.object_uri(sha)
        ref = ObjectRef(sha, size, with_name(uri, name))

        def preflight() -> bool:
            headers = {**self._signed("PUT", sha, size), H_CHECK: "1"}
            resp = self.client.put(uri, headers=headers)
            raise_for_status(resp, uri)
            return bool(resp.json()["exists"])

        def upload() -> None:
            # Signed per attempt: a retry after a long backoff must not carry a stale timestamp.
            headers = {**self._signed("PUT", sha, size), "content-length": str(size)}
            with progress_bar(size, f"put {Path(path).name}", progress) as bar:

                def body():
                    for chunk in iter_file(path):
                        bar.update(len(chunk))
                        yield chunk

                resp = self.client.put(uri, content=body(), headers=headers)
            raise_for_status(resp, uri)

        if not self._call(uri, "PUT preflight", preflight):
            self._call(uri, "PUT", upload)
        return ref

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

        def size_of() -> int:
            resp = self.client.head(uri)
            raise_for_status(resp, uri)  # 404 -> "missing"
            return int(resp.headers["content-length"])

        @contextmanager
        def open_stream(pos: int):
            headers = {"range": f"bytes={pos}-"} if pos else {}
            with self.client.stream("GET", uri, headers=headers) as resp:
                raise_for_status(resp, uri)
                skip = pos if resp.status_code == 200 else 0  # a server that ignored Range
                if resp.status_code == 206 and not resp.headers.get("content-range", "").startswith(
                    f"bytes {pos}-"
                ):
                    raise StorageError("bad_request", uri, "the server answered another range")
                yield _skip(resp.iter_raw(CHUNK), skip)

        return download(
            sha256=sha,
            uri=uri,
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
        uri = self.object_uri(resolve(uri_or_ref, self.uri))
        if length == 0:
            if self._head(uri.rpartition("/")[2]).status_code == 404:
                raise StorageError("missing", uri, "no such object")
            return b""

        def fetch() -> bytes:
            headers = {"range": f"bytes={start}-{start + length - 1}"}
            with self.client.stream("GET", uri, headers=headers) as resp:
                if resp.status_code == 416:
                    return b""
                raise_for_status(resp, uri)
                skip = start if resp.status_code == 200 else 0
                out = bytearray()
                for chunk in _skip(resp.iter_raw(CHUNK), skip):
                    out += chunk[: length - len(out)]
                    if len(out) >= length:
                        break
                return bytes(out)

        return self._call(uri, "GET range", fetch)

    def exists(self, sha256: str) -> bool:
        return self._head(sha256).status_code != 404

    def delete(self, sha256: str) -> None:
        uri = self.object_uri(sha256)

        def call() -> None:
            raise_for_status(
                self.client.delete(uri, headers=self._signed("DELETE", sha256, 0)), uri
            )

        self._call(uri, "DELETE", call)

    def list(self):
        after = ""
        url = f"{self.uri}/objects"

        def page_after(cursor: str) -> dict:
            resp = self.client.get(url, params={"after": cursor})
            raise_for_status(resp, url)
            return resp.json()

        while True:
            page = self._call(url, "list", lambda a=after: page_after(a))
            yield from page["objects"]
            if not page["next"]:
                return
            after = page["next"]


def _skip(chunks, n: int):
    """The chunks minus their first n bytes."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0
