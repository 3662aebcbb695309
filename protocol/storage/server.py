"""The blob server: content-addressed objects over HTTP, signed writes, public ranged reads.

    moesaic store serve --root DIR --host 127.0.0.1 --port 8765 --allow allow.txt

    PUT    /objects/<sha256>   the bytes; x-moesaic-size + signature headers (auth.py) -> 201
                               with x-moesaic-check: 1 and no body, a preflight: auth, cap,
                               quota and existence checked (a refused 10 GB upload fails
                               before its first byte, not with a broken pipe); if the bytes
                               are stored already, the preflight records the signer's claim
    GET    /objects/<sha256>   Range: bytes=a-b | a- | -n -> 206, otherwise 200; streamed
    HEAD   /objects/<sha256>   200 with Content-Length, or 404
    DELETE /objects/<sha256>   signed like a PUT of size 0 -> 204; removes the signer's claim
                               (403 "not_owner" if it holds none); the bytes go with the last
    GET    /objects?after=SHA&limit=N   {"objects": [...], "next": SHA | null}
    GET    /health

Memory stays constant whatever the object size: a PUT body is hashed and written chunk by
chunk as it arrives and refused as soon as it passes the declared size or the server's cap;
a GET is read from disk 1 MiB at a time. Objects live in the FileStore layout (file.py), so a
restarted server serves everything it stored before.

Abuse bounds: each upload is a claim by its signer, and only claims are deleted (claims.py:
nobody can remove an object another identity uploaded); each identity's claims are held to a
quota of bytes and objects (413 "over_quota", nothing stored is touched); connections are
limited in time and number (guard.py); a malformed header is a 4xx with a JSON reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from protocol.storage import SHA256_RE
from protocol.storage.auth import H_CHECK, H_SIZE, AllowList, Denied, check_request, normalise
from protocol.storage.claims import ClaimBook, Quota, Usage, over_quota
from protocol.storage.file import FileStore
from protocol.storage.guard import ConnectionLimits, guarded_protocol
from protocol.storage.transfer import CHUNK

DEFAULT_MAX_BYTES = 256 << 30  # 256 GiB: a whole bf16 checkpoint of a large MoE fits
# Per identity: a few large checkpoints, or years of one delta and manifest a round.
DEFAULT_QUOTA = Quota(max_bytes=1 << 40, max_objects=10_000)
DEFAULT_LIMITS = ConnectionLimits()  # 10 s for a request head, 60 s of stall, 256 connections
LIST_LIMIT = 1000
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
# Sizes and limits are ASCII digits only: str.isdigit() accepts "²" (int() then raises, a 500).
_NUMBER_RE = re.compile(r"[0-9]{1,18}")
# Byte positions past any object this server can hold. Longer digit strings are read as this
# instead of converted: int() of thousands of digits raises (a 500 with a traceback) or costs
# quadratic time, and a position that large only ever means "past the end".
_PAST_ANY_OBJECT = 10**18


def _position(digits: str) -> int:
    return _PAST_ANY_OBJECT if len(digits) > 18 else int(digits)


class Unsatisfiable(Exception):
    """The Range asks for bytes past the end of the object (HTTP 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive for a single `bytes=` range, None to serve the whole object.

    Per RFC 9110 a missing, malformed or multi-range header is ignored (None); a well-formed
    range that starts past the end, or a zero-length suffix, raises Unsatisfiable.
    """
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last n bytes
        n = _position(m[2])
        if n == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - n), size - 1
    start = _position(m[1])
    end = _position(m[2]) if m[2] else None
    if end is not None and end < start:
        return None
    if start >= size:
        raise Unsatisfiable(header)
    return start, min(end, size - 1) if end is not None else size - 1


def _error(status: int, code: str, message: str, **headers: str):
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _read_chunks(f, length: int):
    """Yield `length` bytes from an open file, then close it (runs in Starlette's threadpool)."""
    try:
        while length > 0:
            data = f.read(min(CHUNK, length))
            if not data:
                return
            length -= len(data)
            yield data
    finally:
        f.close()


class _ObjectStream(StreamingResponse):
    """An object's bytes, streamed; its file is closed however the stream ends. A client cut
    off mid-stream (guard.py) cancels the stream, and the chunk generator alone would then
    keep the file open until garbage collection: one descriptor leaked per slow reader."""

    def __init__(self, f, length: int, *, status_code: int, headers: dict[str, str]):
        super().__init__(
            _read_chunks(f, length),
            status_code=status_code,
            headers=headers,
            media_type="application/octet-stream",
        )
        self._file = f

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            self._file.close()


class BlobServer:
    """The request handlers over one FileStore root."""

    def __init__(
        self,
        root: str | Path,
        *,
        allow: AllowList | None,
        max_bytes: int,
        quota: Quota = DEFAULT_QUOTA,
    ):
        self.store = FileStore(root)
        self.allow = allow
        self.max_bytes = max_bytes
        self.quota = quota
        self._sweep_temp_files()
        self.claims = ClaimBook.open(self.store.root, self._stored())
        self._pending: dict[str, Usage] = {}  # bytes and objects of uploads in flight, per signer
        self._lock = asyncio.Lock()  # claims change, and objects appear or go, one at a time

    def _stored(self) -> dict[str, int]:
        return {sha: self.store.size(sha) for sha in self.store.list()}

    def _sweep_temp_files(self, older_than_s: float = 3600) -> None:
        # Left by a crash mid-upload; young ones may belong to a live writer sharing the root.
        for p in self.store.tmp.glob("put-*.tmp"):
            if time.time() - p.stat().st_mtime > older_than_s:
                p.unlink(missing_ok=True)

    def _sha(self, request) -> str | None:
        sha = request.path_params["sha256"]
        return sha if SHA256_RE.fullmatch(sha) else None

    async def get(self, request):
        if not (sha := self._sha(request)):
            return _error(400, "bad_request", "object names are 64 lowercase hex chars")
        try:
            f = self.store.object_path(sha).open("rb")  # open now: survives a concurrent delete
        except FileNotFoundError:
            return _error(404, "missing", f"no object {sha}")
        size = os.fstat(f.fileno()).st_size
        try:
            rng = parse_range(request.headers.get("range"), size)
        except Unsatisfiable:
            f.close()
            return _error(
                416, "bad_request", "range not satisfiable", **{"content-range": f"bytes */{size}"}
            )
        start, end = rng if rng else (0, size - 1)
        headers = {
            "accept-ranges": "bytes",
            "etag": f'"{sha}"',
            "cache-control": "public, max-age=31536000, immutable",  # content-addressed
            "content-length": str(end - start + 1),
        }
        if rng:
            headers["content-range"] = f"bytes {start}-{end}/{size}"
        status = 206 if rng else 200
        if request.method == "HEAD":
            f.close()
            return Response(status_code=status, headers=headers)
        f.seek(start)
        return _ObjectStream(f, end - start + 1, status_code=status, headers=headers)

    async def put(self, request):
        if not (sha := self._sha(request)):
            return _error(400, "bad_request", "object names are 64 lowercase hex chars")
        declared = request.headers.get(H_SIZE, "")
        if not _NUMBER_RE.fullmatch(declared):
            if declared.isascii() and declared.isdigit():  # 19+ digits: past any cap
                return _error(413, "too_large", f"{H_SIZE} is over the cap", connection="close")
            return _error(400, "bad_request", f"send the body size in {H_SIZE} (ASCII digits)")
        declared = int(declared)
        try:
            who = check_request(self.allow, "PUT", request.url.path, sha, declared, request.headers)
            who = normalise(who)
        except Denied as d:
            return _error(d.status, "denied", d.reason, connection="close")
        if declared > self.max_bytes:
            return _error(
                413,
                "too_large",
                f"{declared} bytes is over the cap of {self.max_bytes}",
                connection="close",
            )
        preflight = bool(request.headers.get(H_CHECK))
        length = request.headers.get("content-length")
        if not preflight and length is not None and length != str(declared):
            return _error(
                400,
                "bad_request",
                f"content-length {length} != {H_SIZE} {declared}",
                connection="close",
            )
        async with self._lock:  # the quota check and the claim or reservation, as one step
            if refused := self._over_quota(sha, declared, who):
                return refused
            exists = self.store.exists(sha)
            if exists:  # the same bytes as stored: the upload is this claim
                await run_in_threadpool(self.claims.add, sha, self.store.size(sha), who)
            elif not preflight:
                self._pending[who] = self._pending.get(who, Usage()).plus(declared)
        if preflight:  # the verdict before any body is sent
            return JSONResponse({"exists": exists, "max_bytes": self.max_bytes})
        if exists:  # the body is left unread, so the connection cannot be reused
            body = {"sha256": sha, "size": declared, "created": False}
            return JSONResponse(body, headers={"connection": "close"})
        return await self._receive(request, sha, declared, who)

    def _over_quota(self, sha: str, size: int, who: str):
        """A 413 "over_quota" response if one more object would pass `who`'s quota, else None."""
        if self.claims.holds(sha, who):
            return None  # already charged for these bytes
        held = self.claims.usage(who)
        pending = self._pending.get(who, Usage())
        usage = Usage(held.bytes + pending.bytes, held.objects + pending.objects)
        if why := over_quota(usage, size, self.quota):
            message = f"quota: {who} {why} (uploads in flight included); delete some first"
            return _error(413, "over_quota", message, connection="close")
        return None

    async def _receive(self, request, sha: str, declared: int, who: str):
        """Stream the body to a temp file while hashing; install it only if it is exactly right.
        Its size counts against the signer's quota while it streams (reserved by `put`)."""
        h, n, tmp = hashlib.sha256(), 0, None
        try:
            fd, tmp = self.store.temp_file()
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > declared:  # stop reading: the rest is never accepted
                        return _error(
                            413,
                            "too_large",
                            f"body exceeds the declared {declared} bytes",
                            connection="close",
                        )
                    f.write(chunk)
                    h.update(chunk)
                if n < declared:
                    return _error(400, "bad_request", f"body ended after {n} of {declared} bytes")
                if h.hexdigest() != sha:
                    return _error(
                        422, "digest_mismatch", f"body hashes to {h.hexdigest()}, not {sha}"
                    )
                f.flush()
                await run_in_threadpool(os.fsync, f.fileno())
            async with self._lock:  # the claim first: an installed object always has one
                await run_in_threadpool(self.claims.add, sha, n, who)
                await run_in_threadpool(self.store.install, tmp, sha)
            return JSONResponse({"sha256": sha, "size": n, "created": True}, status_code=201)
        except ClientDisconnect:  # gone, or cut off by the stall timeout (guard.py)
            return _error(400, "bad_request", f"client went away after {n} of {declared} bytes")
        finally:
            left = self._pending.pop(who).plus(-declared, -1)
            if left.objects:
                self._pending[who] = left
            if tmp is not None:
                tmp.unlink(missing_ok=True)  # after install it is gone already

    async def delete(self, request):
        if not (sha := self._sha(request)):
            return _error(400, "bad_request", "object names are 64 lowercase hex chars")
        try:
            who = check_request(self.allow, "DELETE", request.url.path, sha, 0, request.headers)
            who = normalise(who)
        except Denied as d:
            return _error(d.status, "denied", d.reason)
        async with self._lock:
            if not self.claims.holds(sha, who):
                if not self.store.exists(sha):
                    return Response(status_code=204)  # nothing there: deleting is idempotent
                return _error(
                    403,
                    "not_owner",
                    f"{who} holds no claim on {sha}: only an identity that uploaded an object "
                    "can remove it",
                )
            if await run_in_threadpool(self.claims.remove, sha, who) == 0:
                await run_in_threadpool(self.store.delete, sha)
                await run_in_threadpool(self.claims.forget, sha)
        return Response(status_code=204)

    async def list(self, request):
        after = request.query_params.get("after", "")
        limit = request.query_params.get("limit", str(LIST_LIMIT))
        if not _NUMBER_RE.fullmatch(limit):
            return _error(400, "bad_request", "limit must be a number (ASCII digits)")
        limit = min(int(limit), LIST_LIMIT)
        page, more = [], False
        for sha in self.store.list(after=after):
            if len(page) == limit:
                more = True
                break
            page.append(sha)
        return JSONResponse({"objects": page, "next": page[-1] if more else None})

    async def health(self, request):
        # Liveness only: nothing about the machine (its paths) is anyone's business.
        return JSONResponse({"ok": True})


def create_app(
    root: str | Path,
    *,
    allow: AllowList | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    quota: Quota = DEFAULT_QUOTA,
):
    """The Starlette app serving `root`. Without an allow-list every write is refused."""
    srv = BlobServer(root, allow=allow, max_bytes=max_bytes, quota=quota)
    obj = "/objects/{sha256}"
    return Starlette(
        routes=[
            Route(obj, srv.get, methods=["GET", "HEAD"]),
            Route(obj, srv.put, methods=["PUT"]),
            Route(obj, srv.delete, methods=["DELETE"]),
            Route("/objects", srv.list, methods=["GET"]),
            Route("/health", srv.health, methods=["GET"]),
        ]
    )


def serve(
    root: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_file: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    quota: Quota = DEFAULT_QUOTA,
    limits: ConnectionLimits = DEFAULT_LIMITS,
) -> None:
    """Run the server until interrupted (uvicorn's h11 protocol with `limits`, guard.py)."""
    allow = AllowList(path=allow_file) if allow_file else None
    app = create_app(root, allow=allow, max_bytes=max_bytes, quota=quota)
    print(
        json.dumps({"serving": f"http://{host}:{port}", "root": str(Path(root).resolve())}),
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        log_level="warning",
        access_log=False,
    )
