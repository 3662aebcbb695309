"""Storage pieces without servers: signing, Range parsing, the retry policy, the verified
download against fake byte sources, the http client against httpx.MockTransport, and the
Hugging Face checkpoint transfer against a local stand-in for HfApi."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from protocol.storage import ObjectRef, StorageError, open_store, store_uri_of
from protocol.storage.auth import (
    AllowList,
    Denied,
    check_request,
    load_signer,
    request_message,
    signed_headers,
    verify_signature,
)
from protocol.storage.server import Unsatisfiable, parse_range
from protocol.storage.transfer import RetryPolicy, download, is_transient, resolve, retry

ETH = "0x" + hashlib.sha256(b"unit-eth").hexdigest()
OTHER = "0x" + hashlib.sha256(b"unit-other").hexdigest()
NOW = 1_800_000_000
SHA = hashlib.sha256(b"payload").hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- signing ----------------------------------------------------------------------------------


def test_request_message_format_is_frozen():
    msg = request_message("put", "/objects/ab", "ab" * 32, 12, 1700000000)
    assert msg == f"moesaic-store-v1\nPUT\n/objects/ab\n{'ab' * 32}\n12\n1700000000".encode()


@pytest.mark.parametrize("key", [ETH, "sr25519://Alice"])
def test_signatures_verify_only_the_signed_request(key):
    signer = load_signer(key)
    msg = request_message("PUT", f"/objects/{SHA}", SHA, 7, NOW)
    sig = signer.sign(msg)
    assert verify_signature(signer.identity, msg, sig)
    assert not verify_signature(signer.identity, msg.replace(b"\n7\n", b"\n8\n"), sig)
    assert not verify_signature(load_signer(OTHER).identity, msg, sig)
    assert not verify_signature(signer.identity, msg, "0xnothex")


def test_load_signer_forms():
    assert load_signer(ETH).identity == load_signer(ETH.removeprefix("0x")).identity
    assert load_signer("sr25519://Alice").identity.startswith("5Grw")
    seed = "0x" + "11" * 32
    assert load_signer(f"sr25519:{seed}").identity == load_signer(f"sr25519:{seed}").identity
    with pytest.raises(ValueError, match="unrecognised key"):
        load_signer("hunter2")


def _headers(key=ETH, size=7, now=NOW, path=f"/objects/{SHA}"):
    return signed_headers(load_signer(key), "PUT", path, SHA, size, now=now)


@pytest.mark.parametrize(
    "case, status, reason",
    [
        ("unsigned", 401, "unsigned"),
        ("no allow-list", 403, "read-only"),
        ("stale", 401, "timestamp"),
        ("unknown signer", 403, "allow-list"),
        ("wrong size", 401, "bad signature"),
        ("wrong path", 401, "bad signature"),
    ],
)
def test_check_request_refuses(case, status, reason):
    allow = AllowList([load_signer(ETH).identity])
    headers = {
        "unsigned": {},
        "no allow-list": _headers(),
        "stale": _headers(now=NOW - 301),
        "unknown signer": _headers(key=OTHER),
        "wrong size": _headers(size=8),
        "wrong path": _headers(path="/objects/other"),
    }[case]
    with pytest.raises(Denied) as e:
        check_request(
            None if case == "no allow-list" else allow,
            "PUT",
            f"/objects/{SHA}",
            SHA,
            7,
            headers,
            now=NOW,
        )
    assert e.value.status == status and reason in e.value.reason


def test_check_request_accepts_and_ignores_address_case():
    identity = load_signer(ETH).identity
    allow = AllowList([identity.lower()])
    assert (
        check_request(allow, "PUT", f"/objects/{SHA}", SHA, 7, _headers(), now=NOW + 299)
        == identity
    )


def test_allow_list_file_is_reread_when_it_changes(tmp_path):
    f = tmp_path / "allow.txt"
    f.write_text("# validators\n5Grw-not-real  # comment\n")
    allow = AllowList(path=f)
    eth = load_signer(ETH).identity
    assert "5Grw-not-real" in allow and eth not in allow
    f.write_text(f"{eth}\n")
    os.utime(f, (1, 1))  # a different mtime even within one clock tick
    assert eth in allow and "5Grw-not-real" not in allow
    with pytest.raises(FileNotFoundError):
        AllowList(path=tmp_path / "absent.txt")


# -- Range ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=90-200", (90, 99)),  # clipped at the end
        ("bytes=-10", (90, 99)),  # suffix
        ("bytes=-500", (0, 99)),
        ("bytes=9-5", None),  # invalid: ignored, whole object
        ("bytes=0-1,5-6", None),  # multi-range: ignored
        ("items=0-5", None),
        ("bytes=-", None),
        ("bytes=abc", None),
        # positions of thousands of digits: past any object, never converted (no 500)
        ("bytes=0-" + "9" * 5000, (0, 99)),
        ("bytes=-" + "9" * 5000, (0, 99)),
        ("bytes=" + "9" * 5000 + "-1", None),  # end before start: ignored
    ],
)
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    "header, size",
    [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=" + "9" * 5000 + "-", 100)],
)
def test_parse_range_unsatisfiable(header, size):
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


# -- retry ------------------------------------------------------------------------------------


def flaky(failures: list[BaseException], result="ok"):
    calls = []

    def fn():
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


def test_retry_backs_off_exponentially_then_succeeds():
    fn, calls = flaky([ConnectionResetError("reset"), TimeoutError(), httpx.ReadError("x")])
    sleeps = []
    policy = RetryPolicy(attempts=5, base_delay=1.0, max_delay=3.0)
    assert retry(fn, uri="u", what="op", policy=policy, sleep=sleeps.append) == "ok"
    assert len(calls) == 4
    for delay, cap in zip(sleeps, [1.0, 2.0, 3.0], strict=True):  # jitter in [cap/2, cap]
        assert cap / 2 <= delay <= cap


def test_retry_gives_up_with_a_storage_error_naming_the_cause():
    fn, calls = flaky([ConnectionResetError("peer reset")] * 3)
    with pytest.raises(StorageError) as e:
        retry(
            fn,
            uri="http://x/objects/1",
            what="GET",
            policy=RetryPolicy(attempts=3),
            sleep=lambda s: None,
        )
    assert e.value.code == "unavailable" and "peer reset" in e.value.message and len(calls) == 3
    assert "http://x/objects/1" in str(e.value)


def test_retry_passes_permanent_errors_through_at_once():
    fn, calls = flaky([StorageError("missing", "u", "gone"), ValueError("bad")])
    with pytest.raises(StorageError, match="missing"):
        retry(fn, uri="u", what="op", sleep=lambda s: None)
    with pytest.raises(ValueError):
        retry(fn, uri="u", what="op", sleep=lambda s: None)
    assert len(calls) == 2


def test_is_transient():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status, code):
        return ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
        )

    assert is_transient(httpx.ConnectError("refused"))
    assert is_transient(StorageError("unavailable", "u", "503", transient=True))
    assert not is_transient(StorageError("digest_mismatch", "u", "x"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(client_error(503, "SlowDown")) and is_transient(
        client_error(500, "InternalError")
    )
    assert not is_transient(client_error(404, "NoSuchKey"))
    assert not is_transient(KeyError("x"))


# -- the verified download against fake sources -----------------------------------------------

DATA = os.urandom(10_000)
FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.002)


def fake_source(data: bytes, fail_after: list[int | None], chunk: int = 1000):
    """open_stream whose i-th opening yields fail_after[i] chunks, then resets (None: all)."""
    opened = []

    @contextmanager
    def open_stream(pos: int):
        opened.append(pos)
        limit = fail_after.pop(0) if fail_after else None

        def chunks():
            for i, start in enumerate(range(pos, len(data), chunk)):
                if limit is not None and i == limit:
                    raise ConnectionResetError("reset by peer")
                yield data[start : start + chunk]

        yield chunks()

    return open_stream, opened


def get(tmp_path, open_stream, data=DATA, size=None, **kw):
    return download(
        uri="fake://obj",
        sha256=sha(data),
        dest_path=tmp_path / "out.bin",
        expected_sha256=sha(data),
        max_bytes=kw.pop("max_bytes", 1 << 20),
        size_of=lambda: len(data) if size is None else size,
        open_stream=open_stream,
        policy=FAST,
        **kw,
    )


def test_download_resumes_after_mid_stream_resets(tmp_path):
    open_stream, opened = fake_source(DATA, [3, 2, None])
    assert get(tmp_path, open_stream).read_bytes() == DATA
    assert opened == [0, 3000, 5000]  # each reconnect continues where the last one stopped


def test_download_keeps_the_part_when_unavailable_and_resumes_later(tmp_path, caplog):
    open_stream, _ = fake_source(DATA, [4, 0, 0, 0])  # progress, then nothing but resets
    with pytest.raises(StorageError, match="unavailable"):
        get(tmp_path, open_stream)
    assert (tmp_path / "out.bin.part").stat().st_size == 4000
    open_stream, opened = fake_source(DATA, [])
    with caplog.at_level(logging.INFO):
        get(tmp_path, open_stream)
    assert opened == [4000] and "resuming at byte 4000" in caplog.text


def test_download_refuses_more_bytes_than_declared(tmp_path):
    open_stream, _ = fake_source(DATA, [])
    with pytest.raises(StorageError, match="too_large"):
        get(tmp_path, open_stream, size=5000)
    assert not list(tmp_path.iterdir())


def test_download_refuses_a_second_writer(tmp_path):
    with open(tmp_path / "out.bin.part", "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(StorageError, match="busy"):
            get(tmp_path, fake_source(DATA, [])[0])


# -- http client against a mock transport -----------------------------------------------------


def test_http_client_retries_5xx_and_copes_with_a_server_ignoring_range(tmp_path):
    from protocol.storage.http import HttpStore

    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.headers.get("range")))
        if len(seen) == 1:
            return httpx.Response(503, json={"message": "warming up"})
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-length": str(len(DATA))})
        return httpx.Response(200, stream=httpx.ByteStream(DATA))  # all of it despite Range

    store = HttpStore("http://blob.test", transport=httpx.MockTransport(handler), retry=FAST)
    (tmp_path / "out.bin.part").write_bytes(DATA[:1234])
    out = store.get(sha(DATA), tmp_path / "out.bin", expected_sha256=sha(DATA), max_bytes=len(DATA))
    assert out.read_bytes() == DATA
    assert seen == [("HEAD", None), ("HEAD", None), ("GET", "bytes=1234-")]
    assert store.read_range(sha(DATA), 100, 10) == DATA[100:110]


# -- uris -------------------------------------------------------------------------------------


def test_resolve_and_store_uri_of():
    base = "http://h:1"
    assert resolve(SHA.upper(), base) == SHA
    assert resolve(ObjectRef(SHA, 1, f"{base}/objects/{SHA}#n"), base) == SHA
    with pytest.raises(ValueError):
        resolve(f"http://other:1/objects/{SHA}", base)
    assert store_uri_of(f"{base}/objects/{SHA}#name") == base
    assert store_uri_of(f"file:///srv/st/objects/ab/{SHA}") == "file:///srv/st"
    assert store_uri_of(f"s3://b/p/{SHA}?endpoint=http://e:9") == "s3://b/p?endpoint=http://e:9"
    with pytest.raises(ValueError):
        store_uri_of("http://h/objects/not-a-digest")


def test_open_store_dispatch(tmp_path):
    from protocol.storage.file import FileStore
    from protocol.storage.http import HttpStore
    from protocol.storage.s3 import S3Store

    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store({"uri": "http://127.0.0.1:1", "timeout": 1.0}), HttpStore)
    s3 = open_store("s3://bkt/a/b?endpoint=http://127.0.0.1:1", access_key="k", secret_key="s")
    assert isinstance(s3, S3Store) and s3.key(SHA) == f"a/b/{SHA}"
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://x")
    with pytest.raises(ValueError, match="unknown s3 uri parameters"):
        open_store("s3://bkt?secret=oops")


def test_cli_size_units():
    from moesaic.commands.store import parse_size

    assert (
        parse_size("256G") == 256 << 30
        and parse_size("64MiB") == 64 << 20
        and parse_size("123") == 123
    )


# -- Hugging Face, with a local stand-in for HfApi --------------------------------------------


class FakeHub:
    """The three HfApi methods we use, over directories: hub/<repo>/<commit>/..."""

    def __init__(self, root: Path):
        self.root = root
        self.commits = 0

    def upload_folder(self, *, repo_id, folder_path, revision, commit_message, ignore_patterns):
        self.commits += 1
        oid = hashlib.sha1(f"{repo_id}{self.commits}".encode()).hexdigest()
        shutil.copytree(
            folder_path, self.root / repo_id / oid, ignore=shutil.ignore_patterns(".cache")
        )
        return SimpleNamespace(oid=oid, commit_message=commit_message)

    def hf_hub_download(self, repo_id, filename, *, revision, local_dir):
        dest = Path(local_dir) / filename
        shutil.copyfile(self.root / repo_id / revision / filename, dest)
        return str(dest)

    def snapshot_download(self, repo_id, *, revision, local_dir, allow_patterns):
        src = self.root / repo_id / revision
        for rel in allow_patterns:
            (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, Path(local_dir) / rel)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(
            parents=True, exist_ok=True
        )  # as hf does
        return local_dir


@pytest.fixture
def published(tmp_path):
    from protocol.storage.hf import publish_checkpoint

    ckpt_dir = tmp_path / "merged"
    (ckpt_dir / "sub").mkdir(parents=True)
    (ckpt_dir / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (ckpt_dir / "model.safetensors").write_bytes(os.urandom(5000))
    (ckpt_dir / "sub" / "extra.bin").write_bytes(b"x" * 10)
    hub = FakeHub(tmp_path / "hub")
    return hub, publish_checkpoint(ckpt_dir, "org/ckpt", api=hub), ckpt_dir


def test_hf_publish_then_pull_verifies_every_file(published, tmp_path):
    from protocol.storage.hf import pull_checkpoint

    hub, ckpt, src = published
    out = pull_checkpoint(ckpt, tmp_path / "pulled", max_bytes=10**6, api=hub)
    for rel in ("config.json", "model.safetensors", "sub/extra.bin"):
        assert (out / rel).read_bytes() == (src / rel).read_bytes()
    assert not (out / ".cache").exists() and ckpt.uri == f"hf://org/ckpt@{ckpt.revision}"


@pytest.mark.parametrize("attack", ["file", "manifest", "cap", "traversal"])
def test_hf_pull_rejects_and_leaves_nothing(published, tmp_path, attack):
    from dataclasses import replace

    from protocol.identity.hashing import canonical_json
    from protocol.storage.hf import MANIFEST_NAME, pull_checkpoint

    hub, ckpt, _ = published
    repo = hub.root / "org/ckpt" / ckpt.revision
    cap = 10**6
    if attack == "file":
        (repo / "model.safetensors").write_bytes(os.urandom(5000))
    elif attack == "manifest":
        (repo / "config.json").write_text("{}")
        ckpt = replace(ckpt, manifest_sha256=sha(b"a manifest the attacker rewrote"))
    elif attack == "cap":
        cap = 100
    else:
        doc = {"version": 1, "files": {"../evil": {"sha256": SHA, "size": 1}}}
        (repo / MANIFEST_NAME).write_bytes(canonical_json(doc))
        ckpt = replace(ckpt, manifest_sha256=sha(canonical_json(doc)))
    code = {"file": "digest_mismatch", "manifest": "digest_mismatch", "cap": "too_large"}
    with pytest.raises(StorageError) as e:
        pull_checkpoint(ckpt, tmp_path / "pulled", max_bytes=cap, api=hub)
    assert e.value.code == code.get(attack, "bad_request")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub", "merged"]


def test_fake_hub_matches_the_real_hfapi_signatures():
    """The stand-in may not drift: every parameter it takes exists on huggingface_hub.HfApi."""
    import inspect

    from huggingface_hub import HfApi

    for name in ("upload_folder", "hf_hub_download", "snapshot_download"):
        real = inspect.signature(getattr(HfApi, name)).parameters
        fake = inspect.signature(getattr(FakeHub, name)).parameters
        assert set(fake) <= set(real), (name, set(fake) - set(real))
