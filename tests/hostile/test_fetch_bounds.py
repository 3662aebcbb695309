"""How much of a submission a validator downloads: the assignment's largest delta, never more.

A miner declares its artifact's size in its signed manifest, and a store (or whoever answers in
its place) can send any number of bytes. The validator's bound is max_delta_bytes for the
assignment (every encoding allowed) under the operator's cap, computed from the base's config
alone; a larger declaration is refused before any artifact byte is read, a longer transfer is
cut off at the declared size, and nothing of a refused artifact stays in the validator's state
directory (its manifest does: the record of why).
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from protocol.artifact.delta import max_delta_bytes
from protocol.chain import Commitment
from protocol.identity.keys import EthSigner
from protocol.moe.model import config_layout
from protocol.round.submissions import TOO_LARGE, Expectations, Rejected, fetch_submission
from protocol.settings import EvalSettings
from protocol.storage.file import FileStore
from protocol.storage.http import HttpStore
from protocol.storage.transfer import RetryPolicy

from .conftest import ROUND
from .test_artifacts import BLOCK, CHAIN, DEADLINE, MINER_KEY, signed_manifest

ONE_TRY = RetryPolicy(attempts=1)


def manifest_for(world, sha: str, size: int) -> bytes:
    signer = EthSigner(MINER_KEY)
    fields = dict(
        chain=CHAIN,
        round=ROUND,
        task_id=0,
        base_hash=world["base_hash"],
        assignment_hash=world["assignment"].hash(),
        artifact_sha256=sha,
        artifact_size=size,
        uri=f"http://127.0.0.1/objects/{sha}",
        hotkey=signer.identity,
        tokens=1000,
        encoding="float32",
        format="moesaic-manifest",
        version=1,
    )
    return signed_manifest(fields, signer)


def validator_cap(world) -> int:
    """The bound the validator and the merger compute (validator.node.Validator._delta_cap)."""
    layout = config_layout(str(world["base"]))
    return min(max_delta_bytes(layout, world["assignment"]), EvalSettings().max_artifact_bytes)


def expectations(world, cap: int) -> Expectations:
    return Expectations(
        chain=CHAIN,
        task_id=0,
        base_hash=world["base_hash"],
        assignment_hash=world["assignment"].hash(),
        registered_hotkeys=[EthSigner(MINER_KEY).identity],
        deadline_block=DEADLINE,
        max_artifact_bytes=cap,
    )


def commitment(digest: str) -> Commitment:
    return Commitment(EthSigner(MINER_KEY).identity, ROUND, digest, BLOCK)


def assert_only_the_manifest_is_left(folder: Path) -> None:
    left = sorted(p.name for p in folder.iterdir())
    assert len(left) == 1 and left[0].endswith(".manifest.json"), left


def test_the_bound_is_the_assignments_largest_delta_read_from_the_config(world):
    assert config_layout(str(world["base"])) == world["layout"]  # no weights loaded for it
    cap = validator_cap(world)
    assert cap == world["valid"].cap < EvalSettings().max_artifact_bytes
    assert len(world["valid"].data) <= cap


class CountingStore(FileStore):
    """A file store that counts the bytes it hands out per object."""

    served: dict[str, int]

    def get(self, uri_or_ref, dest_path, **kw):
        sha = str(getattr(uri_or_ref, "sha256", uri_or_ref)).rpartition("/")[2]
        self.served[sha] = self.served.get(sha, 0) + self.size(sha)
        return super().get(uri_or_ref, dest_path, **kw)


def test_a_declared_size_past_the_assignments_bound_is_never_downloaded(world, tmp_path):
    """Junk appended to a valid delta: 1 byte past the bound, far under the operator's 1 GiB
    cap (which alone used to decide). The declaration is honest; the bound refuses it."""
    cap = validator_cap(world)
    data = world["valid"].data + b"\0" * (cap + 1 - len(world["valid"].data))
    store = CountingStore(tmp_path / "store", retry=ONE_TRY)
    store.served = {}
    (tmp_path / "junk.safetensors").write_bytes(data)
    ref = store.put(tmp_path / "junk.safetensors")
    (tmp_path / "m.json").write_bytes(manifest_for(world, ref.sha256, len(data)))
    digest = store.put(tmp_path / "m.json").sha256
    got = fetch_submission(
        store, commitment(digest), expectations(world, cap), dest_dir=tmp_path / "got"
    )
    assert isinstance(got, Rejected) and (got.code, got.rejection) == (TOO_LARGE, TOO_LARGE)
    assert f"cap {cap}" in got.reason
    assert store.served.get(ref.sha256, 0) == 0  # not one artifact byte fetched
    assert_only_the_manifest_is_left(tmp_path / "got")


def lying_server(objects: dict[str, bytes], endless: str):
    """An HTTP server answering like a blob server, except that GET of `endless` sends its
    bytes and then zeros until the client hangs up. Returns (server, bytes sent for endless)."""
    sent = {"bytes": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends when the connection does

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            sha = self.path.rpartition("/")[2]
            self.send_response(200 if sha in objects else 404)
            self.send_header("content-length", str(len(objects.get(sha, b""))))
            self.end_headers()

        def do_GET(self):
            sha = self.path.rpartition("/")[2]
            if sha not in objects:
                self.send_error(404)
                return
            self.send_response(200)
            if sha != endless:
                self.send_header("content-length", str(len(objects[sha])))
            self.end_headers()
            try:
                self.wfile.write(objects[sha])
                sent["bytes"] += len(objects[sha]) if sha == endless else 0
                while sha == endless and sent["bytes"] < 1 << 30:
                    self.wfile.write(b"\0" * 65536)
                    sent["bytes"] += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass  # the validator hung up: what the test expects

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, sent


def test_a_store_sending_more_than_declared_is_cut_off(world, tmp_path):
    """The size the store states (HEAD) matches the manifest, then the GET never ends: the
    download stops at the declared size, the miner gets `too_large`, no file is kept."""
    data = world["valid"].data
    sha = hashlib.sha256(data).hexdigest()
    manifest = manifest_for(world, sha, len(data))
    digest = hashlib.sha256(manifest).hexdigest()
    server, sent = lying_server({sha: data, digest: manifest}, endless=sha)
    try:
        store = HttpStore(f"http://127.0.0.1:{server.server_address[1]}", retry=ONE_TRY)
        got = fetch_submission(
            store,
            commitment(digest),
            expectations(world, validator_cap(world)),
            dest_dir=tmp_path / "got",
        )
        store.close()
    finally:
        server.shutdown()
    assert isinstance(got, Rejected) and (got.code, got.rejection) == (TOO_LARGE, TOO_LARGE)
    assert "sent more than" in got.reason
    assert sent["bytes"] < len(data) + (64 << 20)  # cut off, not read to the server's 1 GiB
    assert_only_the_manifest_is_left(tmp_path / "got")
