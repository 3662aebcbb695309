"""Attacks on the blob server, run against the real `moesaic store serve` process on 127.0.0.1.

Ownership (a miner on the allow-list deleting a rival's delta or the merger's checkpoint after
the commit deadline), per-identity quotas, connections that never finish their request (idle,
slowloris, stalled bodies, readers that take nothing), and malformed headers fuzzed over raw
sockets. Each server here gets its own root, so claims and quotas start from nothing.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file
from storage_fixtures import ETH_KEY, SR25519_KEY, running_blob_server

from protocol.storage import StorageError
from protocol.storage.auth import load_signer, signed_headers
from protocol.storage.http import HttpStore
from protocol.storage.transfer import RetryPolicy

MINER_KEY = ETH_KEY  # the honest miner: its delta is the target
RIVAL_KEY = SR25519_KEY  # another miner, also on the allow-list
MERGER_KEY = "0x" + hashlib.sha256(b"moesaic-store-abuse-merger").hexdigest()
KEYS = (MINER_KEY, RIVAL_KEY, MERGER_KEY)
FAST_RETRY = RetryPolicy(attempts=2, base_delay=0.01, max_delay=0.05)


def identity(key: str) -> str:
    return load_signer(key).identity


def store(srv, key: str | None = None) -> HttpStore:
    return HttpStore(srv.url, signer=load_signer(key) if key else None, retry=FAST_RETRY)


def server(tmp_path: Path, *options: str, name: str = "root"):
    return running_blob_server(
        tmp_path / name, allow=[identity(k) for k in KEYS], options=tuple(options)
    )


def delta_file(path: Path, seed: int, n: int = 4096) -> Path:
    """A real safetensors file (a stand-in delta or checkpoint shard)."""
    rng = np.random.default_rng(seed)
    save_file(
        {"model.layers.0.mlp.experts.0.up_proj.weight": rng.standard_normal(n, "float32")}, path
    )
    return path


def signed_delete(srv, key: str, sha: str) -> httpx.Response:
    headers = signed_headers(load_signer(key), "DELETE", f"/objects/{sha}", sha, 0)
    return httpx.delete(f"{srv.url}/objects/{sha}", headers=headers, timeout=10)


def fetched(srv, ref, tmp_path: Path) -> bytes:
    """The object's bytes, downloaded by an anonymous reader and verified."""
    out = tmp_path / f"check-{ref.sha256[:8]}-{time.monotonic_ns()}"
    got = store(srv).get(ref.sha256, out, expected_sha256=ref.sha256, max_bytes=ref.size)
    return got.read_bytes()


def server_log(srv) -> str:
    return (srv.root.parent / f"{srv.root.name}.log").read_text()


# -- ownership ----------------------------------------------------------------------------------


def test_miner_cannot_delete_a_rivals_delta_after_the_commit_deadline(tmp_path):
    """The rival's key is on the allow-list, the deadline has passed, validators are about to
    fetch: its DELETE of the honest miner's delta and manifest is a 403, both stay fetchable."""
    with server(tmp_path) as srv:
        delta = delta_file(tmp_path / "delta.safetensors", seed=1)
        (tmp_path / "manifest.json").write_text('{"manifest": "signed by the miner"}')
        ref = store(srv, MINER_KEY).put(delta, name="delta.safetensors")
        manifest = store(srv, MINER_KEY).put(tmp_path / "manifest.json")
        for target in (ref, manifest):
            resp = signed_delete(srv, RIVAL_KEY, target.sha256)
            assert resp.status_code == 403, resp.text
            assert resp.json()["error"] == "not_owner"
            with pytest.raises(StorageError) as e:  # the client names it as a refusal
                store(srv, RIVAL_KEY).delete(target.sha256)
            assert e.value.code == "denied"
        assert fetched(srv, ref, tmp_path) == delta.read_bytes()
        assert fetched(srv, manifest, tmp_path) == (tmp_path / "manifest.json").read_bytes()


def test_miner_cannot_delete_a_merged_checkpoint_object(tmp_path):
    with server(tmp_path) as srv:
        shard = delta_file(tmp_path / "model.safetensors", seed=2, n=20_000)
        ref = store(srv, MERGER_KEY).put(shard, name="model.safetensors")
        for key in (RIVAL_KEY, MINER_KEY):
            assert signed_delete(srv, key, ref.sha256).status_code == 403
        assert fetched(srv, ref, tmp_path) == shard.read_bytes()
        store(srv, MERGER_KEY).delete(ref.sha256)  # its uploader may
        assert not store(srv).exists(ref.sha256)


def test_claiming_a_rivals_bytes_then_deleting_them_leaves_them_stored(tmp_path):
    """Content addressing lets anyone upload bytes it can read or predict. Either order: the
    rival uploads a copy after the miner, or pre-uploads bytes the miner will upload; its
    DELETE removes only its own claim, and the bytes stay while the miner's claim does."""
    with server(tmp_path) as srv:
        after = delta_file(tmp_path / "after.safetensors", seed=3)
        ref = store(srv, MINER_KEY).put(after)
        assert store(srv, RIVAL_KEY).put(after) == ref  # a copy: the rival now holds a claim
        assert signed_delete(srv, RIVAL_KEY, ref.sha256).status_code == 204
        assert fetched(srv, ref, tmp_path) == after.read_bytes()
        assert signed_delete(srv, RIVAL_KEY, ref.sha256).status_code == 403  # claim spent

        before = delta_file(tmp_path / "before.safetensors", seed=4)
        early = store(srv, RIVAL_KEY).put(before)  # predicted and uploaded first
        assert store(srv, MINER_KEY).put(before) == early  # the preflight records the claim
        assert signed_delete(srv, RIVAL_KEY, early.sha256).status_code == 204
        assert fetched(srv, early, tmp_path) == before.read_bytes()
        store(srv, MINER_KEY).delete(early.sha256)  # the last claim: now the bytes go
        assert not store(srv).exists(early.sha256)


def test_ownership_survives_a_restart_and_older_objects_are_append_only(tmp_path):
    delta = delta_file(tmp_path / "delta.safetensors", seed=5)
    with server(tmp_path) as srv:
        ref = store(srv, MINER_KEY).put(delta)
    claim = srv.root / "claims" / ref.sha256[:2] / f"{ref.sha256}.json"
    assert identity(MINER_KEY).lower() in claim.read_text()
    # An object written before claims existed (by an older server): nobody holds it.
    legacy = delta_file(tmp_path / "legacy.safetensors", seed=6)
    sha = hashlib.sha256(legacy.read_bytes()).hexdigest()
    (srv.root / "objects" / sha[:2]).mkdir(exist_ok=True)
    (srv.root / "objects" / sha[:2] / sha).write_bytes(legacy.read_bytes())
    with server(tmp_path) as srv:  # a new process on the same root
        assert signed_delete(srv, RIVAL_KEY, ref.sha256).status_code == 403
        assert fetched(srv, ref, tmp_path) == delta.read_bytes()
        store(srv, RIVAL_KEY).put(legacy)  # a claim on the legacy bytes...
        assert signed_delete(srv, RIVAL_KEY, sha).status_code == 204  # ...removes only itself
        assert signed_delete(srv, MINER_KEY, sha).status_code == 403
        assert store(srv).exists(sha)
        store(srv, MINER_KEY).delete(ref.sha256)
        assert not store(srv).exists(ref.sha256) and not claim.exists()


# -- quotas ---------------------------------------------------------------------------------------


def test_upload_over_quota_is_refused_and_keeps_what_is_stored(tmp_path):
    quota = ("--quota-bytes", "100000", "--quota-objects", "3")
    with server(tmp_path, *quota) as srv:
        files = [tmp_path / f"f{i}.bin" for i in range(4)]
        for i, f in enumerate(files):
            f.write_bytes(os.urandom(40_000 if i < 2 else 10_000))
        miner = store(srv, MINER_KEY)
        refs = [miner.put(files[0]), miner.put(files[1])]  # 80,000 bytes, 2 objects
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(30_000))  # 110,000 > 100,000 bytes
        with pytest.raises(StorageError) as e:
            miner.put(big)
        assert e.value.code == "over_quota" and "quota of 100000" in e.value.message
        digest = hashlib.sha256(big.read_bytes()).hexdigest()
        headers = signed_headers(
            load_signer(MINER_KEY), "PUT", f"/objects/{digest}", digest, 30_000
        )
        raw = httpx.put(f"{srv.url}/objects/{digest}", content=big.read_bytes(), headers=headers)
        assert raw.status_code == 413 and raw.json()["error"] == "over_quota"
        assert not store(srv).exists(digest)
        refs.append(miner.put(files[2]))  # 90,000 bytes, 3 objects: fits
        with pytest.raises(StorageError, match="3 objects"):
            miner.put(files[3])  # 100,000 bytes but a 4th object
        for ref, f in zip(refs, files, strict=False):  # nothing stored was touched
            assert fetched(srv, ref, tmp_path) == f.read_bytes()
        assert store(srv, RIVAL_KEY).put(big).sha256 == digest  # quotas are per identity
        miner.delete(refs[0].sha256)  # frees 40,000 bytes and an object
        assert miner.put(files[3]).size == 10_000
        # Re-uploading what one already holds is not charged twice.
        assert miner.put(files[1]) == refs[1]


# -- connections ----------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closed (FIN or reset) this connection within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass  # a 503 or 408 body before the close
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_idle_and_slowloris_connections_are_cut_off_and_a_real_request_still_succeeds(tmp_path):
    """200 connections that send nothing and 8 that send a header byte every 0.2 s, against a
    server allowing 16 connections and 1 s for a request head: the server's descriptors stay
    bounded, a real upload and download succeed at once, and every attacker is cut off."""
    limits = ("--header-timeout", "1", "--max-connections", "16")
    with server(tmp_path, *limits) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        (tmp_path / "warm.bin").write_bytes(b"warm")  # the first signature loads eth-account
        store(srv, MINER_KEY).put(tmp_path / "warm.bin")
        time.sleep(1.2)  # that client's kept-alive connection is closed by then
        baseline = open_fds(srv.pid)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        stop = threading.Event()
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]

        def drip(sock):
            head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 10_000
            try:
                for byte in head:
                    if stop.wait(0.2):
                        return
                    sock.send(bytes([byte]))
            except OSError:
                return  # cut off: what the test expects

        threads = [threading.Thread(target=drip, args=(s,), daemon=True) for s in slow]
        for t in threads:
            t.start()
        try:
            time.sleep(0.3)
            fds = open_fds(srv.pid)
            assert fds - baseline <= 16 + 4, (baseline, fds)  # not 208 sockets
            started = time.monotonic()
            data = os.urandom(100_000)
            (tmp_path / "d.bin").write_bytes(data)
            ref = store(srv, MINER_KEY).put(tmp_path / "d.bin")
            assert fetched(srv, ref, tmp_path) == data
            assert time.monotonic() - started < 1.0  # not after the attackers time out
            cut = [closed_by_server(s, within=2.5) for s in idle + slow]
            assert all(cut), f"{cut.count(False)} attacker connections still open"
            assert open_fds(srv.pid) - baseline <= 4
        finally:
            stop.set()
            for s in idle + slow:
                s.close()


def test_stalled_upload_body_is_cut_off_and_nothing_is_stored(tmp_path):
    options = ("--stall-timeout", "1", "--quota-bytes", "100000")
    with server(tmp_path, *options) as srv:
        body = os.urandom(100_000)  # the whole quota
        digest = hashlib.sha256(body).hexdigest()
        headers = signed_headers(
            load_signer(MINER_KEY), "PUT", f"/objects/{digest}", digest, len(body)
        )
        port = int(srv.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            head = f"PUT /objects/{digest} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            s.sendall(head.encode() + body[:50_000])  # then nothing
            started = time.monotonic()
            assert closed_by_server(s, within=5)
            assert time.monotonic() - started < 3
        assert not store(srv).exists(digest)
        assert not list((srv.root / "tmp").glob("put-*.tmp"))
        (tmp_path / "full.bin").write_bytes(body)  # its reservation was released
        assert store(srv, MINER_KEY).put(tmp_path / "full.bin").sha256 == digest


def test_reader_that_takes_nothing_is_cut_off(tmp_path):
    with server(tmp_path, "--stall-timeout", "1") as srv:
        data = os.urandom(24 << 20)  # more than the socket buffers hold
        (tmp_path / "big.bin").write_bytes(data)
        ref = store(srv, MINER_KEY).put(tmp_path / "big.bin")
        port = int(srv.url.rsplit(":", 1)[1])
        baseline = open_fds(srv.pid)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET /objects/{ref.sha256} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        time.sleep(3)  # read nothing: the server's write buffer fills and stays full
        assert open_fds(srv.pid) <= baseline  # its socket and object file are closed
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        s.close()
        assert received < len(data)


# -- malformed requests ---------------------------------------------------------------------------


def raw_request(port: int, head: bytes, body: bytes = b"") -> int:
    """Send raw bytes; the status code of the answer (0 if the server just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        reply = b""
        try:
            while b"\r\n" not in reply and (chunk := s.recv(4096)):
                reply += chunk
        except ConnectionResetError:
            pass
    return int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def test_malformed_headers_get_4xx_never_a_500(tmp_path):
    with server(tmp_path) as srv:
        (tmp_path / "o.bin").write_bytes(os.urandom(1000))
        ref = store(srv, MINER_KEY).put(tmp_path / "o.bin")
        sha, port = ref.sha256, int(srv.url.rsplit(":", 1)[1])
        good = signed_headers(load_signer(MINER_KEY), "PUT", f"/objects/{sha}", sha, 1000)

        def put(**override: str) -> bytes:
            fields = {**good, "content-length": "1000", **override}
            lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
            return f"PUT /objects/{sha} HTTP/1.1\r\nhost: x\r\n{lines}\r\n".encode("latin-1")

        def get(line: str) -> bytes:
            return f"GET /objects/{sha} HTTP/1.1\r\nhost: x\r\n{line}\r\n\r\n".encode("latin-1")

        cases = {
            "content-length not a number": put(**{"content-length": "abc"}),
            "content-length negative": put(**{"content-length": "-1"}),
            "content-length huge": put(**{"content-length": "9" * 40}),
            "content-length float": put(**{"content-length": "1e3"}),
            "size superscript digit": put(**{"x-moesaic-size": "\u00b2"}),
            "size negative": put(**{"x-moesaic-size": "-5"}),
            "size thousands of digits": put(**{"x-moesaic-size": "9" * 5000}),
            "timestamp superscript": put(**{"x-moesaic-timestamp": "\u00b9\u00b2"}),
            "timestamp thousands of digits": put(**{"x-moesaic-timestamp": "9" * 5000}),
            "signer non-ascii": put(**{"x-moesaic-signer": "0x\u00e9" * 10}),
            "signature not hex": put(**{"x-moesaic-signature": "zz" * 65}),
            "no signature": put(**{"x-moesaic-signature": None}),
            "no signer": put(**{"x-moesaic-signer": None}),
            "no timestamp": put(**{"x-moesaic-timestamp": None}),
            "no size": put(**{"x-moesaic-size": None}),
            "range superscript": get("range: bytes=\u00b2-"),
            "range empty": get("range: bytes=-"),
            "range reversed": get("range: bytes=5-1"),
            "range other unit": get("range: items=0-1"),
            "range several": get("range: bytes=0-1,2-3"),
            "range huge suffix": get("range: bytes=-" + "9" * 5000),
            "range non-ascii": get("range: bytes=\u00ff\u00fe-"),
            "header non-ascii name": get("x-\u00e9: 1"),
            "list limit superscript": b"GET /objects?limit=%C2%B2 HTTP/1.1\r\nhost: x\r\n\r\n",
            "list limit huge": b"GET /objects?limit="
            + b"9" * 5000
            + b" HTTP/1.1\r\nhost: x\r\n\r\n",
            "path non-ascii": b"GET /objects/\xff\xfe HTTP/1.1\r\nhost: x\r\n\r\n",
            "path percent-encoded junk": b"GET /objects/%ff%00 HTTP/1.1\r\nhost: x\r\n\r\n",
            "delete unsigned": f"DELETE /objects/{sha} HTTP/1.1\r\nhost: x\r\n\r\n".encode(),
            "no host": b"GET /health HTTP/1.1\r\n\r\n",
            "not http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        }
        statuses = {name: raw_request(port, head) for name, head in cases.items()}
        server_errors = {k: v for k, v in statuses.items() if v >= 500 or v == 0}
        assert server_errors == {}, statuses
        assert statuses["size superscript digit"] == 400
        assert statuses["timestamp superscript"] == 401
        assert statuses["size thousands of digits"] == 413
        assert statuses["list limit superscript"] == 400
        assert statuses["range superscript"] == 200  # ignored, as RFC 9110 says
        assert "Traceback" not in server_log(srv)
        assert fetched(srv, ref, tmp_path) == (tmp_path / "o.bin").read_bytes()
