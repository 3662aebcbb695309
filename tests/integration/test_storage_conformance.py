"""One suite, every storage backend: file, the blob server (a subprocess), S3 on moto and s3rver.

The same cases run on each, so no backend can drift from the Store contract: round trip,
ranged reads, resume from a .part, digest and size checks that leave nothing behind, missing
objects, idempotent puts. Then what only the blob server has (signed writes, body limits,
restart) and what only S3 has (presigned links).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from storage_fixtures import (
    ETH_KEY,
    MOTO_CREDENTIALS,
    OUTSIDER_KEY,
    S3RVER_CREDENTIALS,
    SR25519_KEY,
    blob_server_fixture,  # noqa: F401  (pytest fixtures, used by name)
    moto_endpoint_fixture,  # noqa: F401
    running_blob_server,
    s3rver_endpoint_fixture,  # noqa: F401
    store_command,
)

from protocol.storage import ObjectRef, StorageError, Store, open_store
from protocol.storage.auth import load_signer, signed_headers
from protocol.storage.file import FileStore
from protocol.storage.transfer import RetryPolicy

FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


@dataclass
class Backend:
    name: str
    store: Store
    corrupt: Callable[[str, bytes], None]  # replace an object's stored bytes behind the store


def _s3_backend(name, endpoint, credentials) -> Backend:
    from protocol.storage.s3 import S3Store

    store = S3Store(
        "moesaic",
        f"t-{uuid.uuid4().hex[:12]}",  # a fresh prefix per test: list() sees only this test
        endpoint=endpoint,
        part_size=5 << 20,
        retry=FAST_RETRY,
        **credentials,
    )

    def corrupt(sha: str, data: bytes) -> None:
        store.client.put_object(Bucket=store.bucket, Key=store.key(sha), Body=data)

    return Backend(name, store, corrupt)


@pytest.fixture(params=["file", "http", "s3-moto", "s3-s3rver"])
def backend(request, tmp_path) -> Backend:
    if request.param == "file":
        store = FileStore(tmp_path / "store", retry=FAST_RETRY)
        yield Backend("file", store, lambda sha, data: store.object_path(sha).write_bytes(data))
    elif request.param == "http":
        from protocol.storage.http import HttpStore

        srv = request.getfixturevalue("blob_server")
        store = HttpStore(srv.url, signer=load_signer(ETH_KEY), retry=FAST_RETRY)
        disk = FileStore(srv.root)
        yield Backend("http", store, lambda sha, data: disk.object_path(sha).write_bytes(data))
        store.close()
    elif request.param == "s3-moto":
        yield _s3_backend("s3-moto", request.getfixturevalue("moto_endpoint"), MOTO_CREDENTIALS)
    else:
        endpoint = request.getfixturevalue("s3rver_endpoint")
        yield _s3_backend("s3-s3rver", endpoint, S3RVER_CREDENTIALS)


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


# -- every backend ----------------------------------------------------------------------------


def test_round_trip(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 300_000)
    ref = backend.store.put(tmp_path / "src.bin", name="delta-r1.safetensors")
    assert isinstance(backend.store, Store)
    assert (ref.sha256, ref.size) == (sha(data), len(data))
    parts = urlsplit(ref.uri)
    assert parts.path.endswith(ref.sha256) and parts.fragment == "delta-r1.safetensors"
    assert backend.store.exists(ref.sha256)
    assert ref.sha256 in set(backend.store.list())
    for i, handle in enumerate((ref, ref.uri, ref.sha256)):  # a ref, its uri or the bare digest
        out = backend.store.get(
            handle, tmp_path / f"out{i}.bin", expected_sha256=ref.sha256, max_bytes=len(data)
        )
        assert out.read_bytes() == data
        assert not out.with_name(out.name + ".part").exists()


def test_multipart_sized_round_trip(backend, tmp_path):
    """12 MiB: three 5 MiB parts on S3, many chunks everywhere else; with progress bars."""
    data = write_random(tmp_path / "big.bin", 12 << 20)
    ref = backend.store.put(tmp_path / "big.bin", progress=True)
    out = backend.store.get(
        ref, tmp_path / "o.bin", expected_sha256=sha(data), max_bytes=1 << 30, progress=True
    )
    assert ref.size == len(data) and out.read_bytes() == data


def test_read_range(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 100_000)
    ref = backend.store.put(tmp_path / "src.bin")
    read = backend.store.read_range
    assert read(ref.uri, 0, 8) == data[:8]  # e.g. a safetensors header length
    assert read(ref, 5_000, 1_234) == data[5_000:6_234]
    assert read(ref.sha256, 99_990, 100) == data[99_990:]  # clipped at the end
    assert read(ref, 100_000, 10) == b""
    assert read(ref, 10, 0) == b""
    with pytest.raises(ValueError):
        read(ref, -1, 10)


def test_resume_continues_a_partial_download(backend, tmp_path, caplog):
    data = write_random(tmp_path / "src.bin", 2_000_000)
    ref = backend.store.put(tmp_path / "src.bin")
    dest = tmp_path / "out.bin"
    dest.with_name("out.bin.part").write_bytes(data[:700_001])  # an interrupted earlier get
    with caplog.at_level(logging.INFO, logger="protocol.storage.transfer"):
        backend.store.get(ref, dest, expected_sha256=ref.sha256, max_bytes=len(data))
    assert dest.read_bytes() == data
    assert "resuming at byte 700001 of 2000000" in caplog.text
    assert not dest.with_name("out.bin.part").exists()


def test_resume_from_a_wrong_partial_still_verifies(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 500_000)
    ref = backend.store.put(tmp_path / "src.bin")
    dest = tmp_path / "out.bin"
    dest.with_name("out.bin.part").write_bytes(os.urandom(200_000))  # not a prefix of data
    backend.store.get(ref, dest, expected_sha256=ref.sha256, max_bytes=len(data))
    assert dest.read_bytes() == data
    dest.with_name("out.bin.part").write_bytes(os.urandom(600_000))  # longer than the object
    backend.store.get(ref, tmp_path / "out.bin", expected_sha256=ref.sha256, max_bytes=len(data))
    assert dest.read_bytes() == data


def test_tampered_object_is_rejected_and_nothing_is_left(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 400_000)
    ref = backend.store.put(tmp_path / "src.bin")
    backend.corrupt(ref.sha256, os.urandom(len(data)))  # a lying or broken server
    dest = tmp_path / "out.bin"
    with pytest.raises(StorageError) as e:
        backend.store.get(ref, dest, expected_sha256=ref.sha256, max_bytes=len(data))
    assert e.value.code == "digest_mismatch" and ref.sha256 in e.value.uri
    assert_nothing_left(dest)


def test_expected_digest_other_than_the_uri_fetches_nothing(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 1000)
    ref = backend.store.put(tmp_path / "src.bin")
    with pytest.raises(StorageError) as e:
        backend.store.get(ref, tmp_path / "o", expected_sha256=sha(b"other"), max_bytes=len(data))
    assert e.value.code == "digest_mismatch"
    assert_nothing_left(tmp_path / "o")


def test_size_cap_is_enforced_before_downloading(backend, tmp_path):
    data = write_random(tmp_path / "src.bin", 300_000)
    ref = backend.store.put(tmp_path / "src.bin")
    dest = tmp_path / "out.bin"
    dest.with_name("out.bin.part").write_bytes(data[:1000])
    with pytest.raises(StorageError) as e:
        backend.store.get(ref, dest, expected_sha256=ref.sha256, max_bytes=len(data) - 1)
    assert e.value.code == "too_large" and "300000" in str(e.value)
    assert_nothing_left(dest)


def test_missing_object(backend, tmp_path):
    ghost = sha(os.urandom(16))
    assert not backend.store.exists(ghost)
    with pytest.raises(StorageError) as e:
        backend.store.get(ghost, tmp_path / "o", expected_sha256=ghost, max_bytes=10)
    assert e.value.code == "missing" and ghost in e.value.uri
    assert_nothing_left(tmp_path / "o")
    with pytest.raises(StorageError, match="missing"):
        backend.store.read_range(ghost, 0, 8)


def test_put_twice_is_idempotent(backend, tmp_path):
    write_random(tmp_path / "src.bin", 50_000)
    first = backend.store.put(tmp_path / "src.bin")
    (tmp_path / "copy.bin").write_bytes((tmp_path / "src.bin").read_bytes())
    second = backend.store.put(tmp_path / "copy.bin")
    assert first == second
    assert list(backend.store.list()).count(first.sha256) == 1


def test_delete(backend, tmp_path):
    write_random(tmp_path / "src.bin", 10_000)
    ref = backend.store.put(tmp_path / "src.bin")
    backend.store.delete(ref.sha256)
    assert not backend.store.exists(ref.sha256)
    backend.store.delete(ref.sha256)  # absent: no error
    with pytest.raises(StorageError, match="missing"):
        backend.store.get(ref, tmp_path / "o", expected_sha256=ref.sha256, max_bytes=10**6)


def test_uri_of_another_store_is_refused(backend, tmp_path):
    foreign = f"file:///elsewhere/objects/ab/{sha(b'x')}"
    with pytest.raises(ValueError, match="not an object of the store"):
        backend.store.get(foreign, tmp_path / "o", expected_sha256=sha(b"x"), max_bytes=10)


def test_open_store_round_trip_from_uri(backend, tmp_path):
    """open_store(store.uri) reaches the same objects (the uri is what a config holds)."""
    if backend.name.startswith("s3"):
        creds = MOTO_CREDENTIALS if backend.name == "s3-moto" else S3RVER_CREDENTIALS
        other = open_store(backend.store.uri, **creds)
    else:
        other = open_store(backend.store.uri)
    data = write_random(tmp_path / "src.bin", 1234)
    ref = backend.store.put(tmp_path / "src.bin")
    assert other.read_range(ref.uri, 0, 2000) == data


# -- the blob server only ---------------------------------------------------------------------


def http_store(srv, key: str | None = ETH_KEY):
    from protocol.storage.http import HttpStore

    return HttpStore(srv.url, signer=load_signer(key) if key else None, retry=FAST_RETRY)


def raw_put(srv, digest: str, body: bytes, headers: dict) -> httpx.Response:
    return httpx.put(f"{srv.url}/objects/{digest}", content=body, headers=headers, timeout=10)


def test_unsigned_upload_is_refused(blob_server, tmp_path):
    write_random(tmp_path / "src.bin", 1000)
    with pytest.raises(ValueError, match="needs a signer"):
        http_store(blob_server, key=None).put(tmp_path / "src.bin")
    body = os.urandom(1000)
    resp = raw_put(blob_server, sha(body), body, {"x-moesaic-size": "1000"})
    assert resp.status_code == 401 and "unsigned" in resp.json()["message"]
    assert not http_store(blob_server).exists(sha(body))


def test_badly_signed_upload_is_refused(blob_server):
    body = os.urandom(1000)
    digest, path = sha(body), f"/objects/{sha(body)}"
    me = load_signer(ETH_KEY)
    forged = signed_headers(load_signer(OUTSIDER_KEY), "PUT", path, digest, 1000)
    forged["x-moesaic-signer"] = me.identity  # claims to be an allowed key
    assert raw_put(blob_server, digest, body, forged).status_code == 401
    other_path = signed_headers(me, "PUT", f"/objects/{sha(b'x')}", digest, 1000)
    assert raw_put(blob_server, digest, body, other_path).status_code == 401  # not for this path
    stale = signed_headers(me, "PUT", path, digest, 1000, now=__import__("time").time() - 400)
    resp = raw_put(blob_server, digest, body, stale)
    assert resp.status_code == 401 and "timestamp" in resp.json()["message"]
    assert not http_store(blob_server).exists(digest)


def test_unknown_signer_is_refused(blob_server, tmp_path):
    write_random(tmp_path / "src.bin", 1000)
    with pytest.raises(StorageError) as e:
        http_store(blob_server, key=OUTSIDER_KEY).put(tmp_path / "src.bin")
    assert e.value.code == "denied" and "allow-list" in e.value.message


def test_sr25519_hotkey_can_upload_and_delete(blob_server, tmp_path):
    data = write_random(tmp_path / "src.bin", 5000)
    store = http_store(blob_server, key=SR25519_KEY)
    ref = store.put(tmp_path / "src.bin")
    assert store.read_range(ref, 0, 5000) == data
    store.delete(ref.sha256)
    assert not store.exists(ref.sha256)


def test_unsigned_delete_is_refused(blob_server, tmp_path):
    write_random(tmp_path / "src.bin", 100)
    ref = http_store(blob_server).put(tmp_path / "src.bin")
    assert httpx.delete(f"{blob_server.url}/objects/{ref.sha256}").status_code == 401
    assert http_store(blob_server).exists(ref.sha256)


def test_body_larger_than_declared_is_cut_off(blob_server):
    """Chunked body past its signed size: 413 as soon as it passes, without the rest."""
    body, declared = os.urandom(64 * 1024), 1000
    digest = sha(body[:declared])
    headers = signed_headers(load_signer(ETH_KEY), "PUT", f"/objects/{digest}", digest, declared)
    port = int(blob_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = (
            f"PUT /objects/{digest} HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n"
        )
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        # No terminating chunk: the server must answer without waiting for the end.
        s.sendall(head.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert not FileStore(blob_server.root).exists(digest)
    assert not list((blob_server.root / "tmp").glob("put-*.tmp"))


def test_declared_size_over_the_server_cap_is_refused_before_sending(blob_server, tmp_path):
    big = tmp_path / "sparse.bin"
    with big.open("wb") as f:
        f.truncate((32 << 20) + 1)  # the session server's cap is 32 MiB
    with pytest.raises(StorageError) as e:
        http_store(blob_server).put(big)
    assert e.value.code == "too_large" and "cap" in e.value.message


def test_content_length_must_equal_the_signed_size(blob_server):
    body = os.urandom(1000)
    digest = sha(body)
    headers = signed_headers(load_signer(ETH_KEY), "PUT", f"/objects/{digest}", digest, 999)
    assert raw_put(blob_server, digest, body, headers).status_code == 400


def test_server_restart_keeps_objects(tmp_path):
    data = write_random(tmp_path / "src.bin", 100_000)
    with running_blob_server(tmp_path / "root") as srv:
        ref = http_store(srv).put(tmp_path / "src.bin", name="kept")
        first_pid = srv.pid
    with running_blob_server(tmp_path / "root") as srv:  # a new process, a new port
        assert srv.pid != first_pid
        store = http_store(srv)
        out = store.get(ref.sha256, tmp_path / "o", expected_sha256=ref.sha256, max_bytes=10**6)
        assert out.read_bytes() == data and list(store.list()) == [ref.sha256]


def test_cli_put_then_get(blob_server, tmp_path):
    import json
    import subprocess

    data = write_random(tmp_path / "src.bin", 70_000)
    (tmp_path / "key.txt").write_text(ETH_KEY + "\n")
    store = ["--store", blob_server.url]
    run = dict(capture_output=True, text=True, timeout=60)
    put = subprocess.run(
        [
            *store_command(),
            "put",
            str(tmp_path / "src.bin"),
            *store,
            "--key",
            str(tmp_path / "key.txt"),
            "--quiet",
        ],
        **run,
    )
    assert put.returncode == 0, put.stderr
    ref = json.loads(put.stdout)
    assert ref["sha256"] == sha(data)
    get = [*store_command(), "get", ref["uri"], *store, "--quiet"]
    ok = subprocess.run([*get, "--sha256", ref["sha256"], "--out", str(tmp_path / "o")], **run)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "o").read_bytes() == data
    bad = subprocess.run([*get, "--sha256", sha(b"no"), "--out", str(tmp_path / "p")], **run)
    assert bad.returncode == 2 and "digest_mismatch" in bad.stderr
    assert not (tmp_path / "p").exists()


def test_fetch_by_object_uri_alone(blob_server, tmp_path):
    """A validator holding only the uri committed on chain can fetch and verify it."""
    from protocol.storage import fetch

    data = write_random(tmp_path / "src.bin", 3000)
    ref = http_store(blob_server).put(tmp_path / "src.bin", name="d.safetensors")
    out = fetch(ref.uri, tmp_path / "o", expected_sha256=ref.sha256, max_bytes=3000)
    assert out.read_bytes() == data


# -- S3 only ----------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["s3-moto", "s3-s3rver"])
def test_presigned_url_needs_no_credentials(server, request, tmp_path):
    fixture = "moto_endpoint" if server == "s3-moto" else "s3rver_endpoint"
    creds = MOTO_CREDENTIALS if server == "s3-moto" else S3RVER_CREDENTIALS
    backend = _s3_backend(server, request.getfixturevalue(fixture), creds)
    data = write_random(tmp_path / "src.bin", 20_000)
    ref = backend.store.put(tmp_path / "src.bin")
    resp = httpx.get(backend.store.presign(ref.sha256, expires=60), timeout=10)
    assert resp.status_code == 200 and resp.content == data


def test_object_ref_is_frozen():
    ref = ObjectRef("0" * 64, 1, "file:///x")
    with pytest.raises(AttributeError):
        ref.size = 2  # type: ignore[misc]


def test_hostile_range_and_health_reveal_nothing(blob_server, tmp_path):
    """A Range of thousands of digits gets an HTTP answer, not a 500 with a traceback, and
    /health says the server is alive without naming its folders."""
    write_random(tmp_path / "src.bin", 1000)
    ref = http_store(blob_server).put(tmp_path / "src.bin")
    url = f"{blob_server.url}/objects/{ref.sha256}"
    huge = "9" * 5000
    past = httpx.get(url, headers={"range": f"bytes={huge}-"}, timeout=10)
    assert past.status_code == 416 and past.headers["content-range"] == "bytes */1000"
    tail = httpx.get(url, headers={"range": f"bytes=10-{huge}"}, timeout=10)
    assert tail.status_code == 206 and len(tail.content) == 990
    health = httpx.get(f"{blob_server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"ok": True}
    assert str(blob_server.root) not in health.text
