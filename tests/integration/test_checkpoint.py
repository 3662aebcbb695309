"""Checkpoints end to end: publish a HF directory to a store, its digest on an anvil registry,
`moesaic checkpoint pull` verified against the chain; and every way a pull must refuse.

Stores: a FileStore and the blob server (a real subprocess). The chain: our registry on anvil,
deployed per test with short phases so the merge phase is a few mined blocks away. The
CLI runs in process through moesaic.cli.main.

    .venv/bin/python -m pytest -q tests/integration/test_checkpoint.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from storage_fixtures import ETH_KEY, blob_server_fixture  # noqa: F401  (fixture, used by name)

from protocol.artifact.checkpoint import FORMAT, VERSION, parse_manifest, publish_dir, pull
from protocol.chain import Checkpoint
from protocol.identity.hashing import sha256_dir, sha256_json
from protocol.round.schedule import Schedule, phase_bounds
from protocol.storage import StorageError, open_store
from protocol.storage.file import FileStore

LENGTHS = dict(train=2, commit=2, reveal=1, evaluate=1, weights=1, merge=3)
DELTAS = hashlib.sha256(b"deltas").hexdigest()
MAX = 1 << 30


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_moe_dir) -> Path:
    """A random MoE saved by save_pretrained, plus files that are not weights or config."""
    path = tmp_path_factory.mktemp("ckpt") / "model"
    shutil.copytree(random_moe_dir, path)
    (path / "moesaic.json").write_text(json.dumps({"format": "moesaic-checkpoint"}) + "\n")
    (path / "README.md").write_text("# a random MoE for tests\n")
    return path


@dataclass
class Registry:
    rpc: str
    address: str
    chain: object  # EvmChain as the owner (allowed to publish checkpoints)
    schedule: Schedule
    node: object

    def publish(self, round: int, digest: str, uri: str) -> int:
        start, _ = phase_bounds(self.schedule, round, "merge")
        if self.node.w3.eth.block_number < start - 1:
            self.node.mine_to(start)
        return self.chain.publish_checkpoint(round, digest, uri, DELTAS)


@pytest.fixture
def registry(anvil_url, anvil_node) -> Registry:
    from protocol.chain.evm import EvmChain, deploy_registry

    schedule = Schedule(start_block=anvil_node.w3.eth.block_number + 3, **LENGTHS)
    owner = anvil_node.accounts[0]
    address = deploy_registry(anvil_node.w3, owner, schedule)
    return Registry(
        anvil_url, address, EvmChain(anvil_node.w3, address, owner), schedule, anvil_node
    )


@pytest.fixture
def cli(capsys):
    """Run `moesaic ...` in process; returns (exit code, stdout, stderr)."""
    from moesaic import cli as moesaic_cli

    def run(*argv: str) -> tuple[int, str, str]:
        rc = moesaic_cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def store(tmp_path) -> FileStore:
    return FileStore(tmp_path / "store")


def chain_args(reg: Registry) -> list[str]:
    return ["--rpc", reg.rpc, "--registry", reg.address]


def record(digest: str, uri: str, round: int = 0) -> Checkpoint:
    """A chain record without a chain: for the refusals pull decides from the record alone."""
    return Checkpoint(round, digest, uri, DELTAS, 1, "0x" + "00" * 20)


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def state_dict(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---------------------------------------------------------------------------- round trips


def _publish_http(cli, tmp_path, server, model_dir) -> tuple[str, str]:
    key = tmp_path / "key.txt"
    key.write_text(ETH_KEY + "\n")
    rc, out, err = cli(
        "checkpoint", "publish", model_dir, "--store", server.url, "--key", key, "--quiet"
    )
    assert rc == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    return fields["digest"], fields["uri"]


@pytest.mark.parametrize("backend", ["file", "http"])
def test_publish_list_pull_round_trip(backend, request, cli, registry, model_dir, tmp_path):
    if backend == "file":
        digest, uri, total = publish_dir(FileStore(tmp_path / "store"), model_dir)
        assert total == sum(p.stat().st_size for p in model_dir.iterdir())
    else:
        server = request.getfixturevalue("blob_server")
        digest, uri = _publish_http(cli, tmp_path, server, model_dir)
        assert uri.startswith(server.url + "/objects/")
    assert digest == sha256_dir(model_dir)
    block = registry.publish(0, digest, uri)

    rc, out, err = cli("checkpoint", "list", *chain_args(registry))
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split()[:2] == ["round", "digest"]
    publisher = registry.chain.address
    assert row.split() == ["0", digest, uri, DELTAS, str(block), publisher]

    out_dir = tmp_path / "pulled" / "ckpt"
    rc, out, err = cli("checkpoint", "pull", *chain_args(registry), "--out", out_dir, "--quiet")
    assert rc == 0, err
    assert f"digest  {digest}" in out and f"path    {out_dir.resolve()}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in model_dir.iterdir())
    for p in model_dir.iterdir():  # every file, tokenizer/provenance/README included
        assert (out_dir / p.name).read_bytes() == p.read_bytes(), p.name
    assert sha256_dir(out_dir) == digest
    assert [p.name for p in out_dir.parent.iterdir()] == ["ckpt"]  # no staging left behind
    want, got = state_dict(model_dir), state_dict(out_dir)
    assert want.keys() == got.keys()
    assert all(want[k].equal(got[k]) for k in want)


def test_manifest_format_and_determinism(store, model_dir):
    digest, uri, total = publish_dir(store, model_dir)
    again = publish_dir(store, model_dir)
    assert again == (digest, uri, total)  # same directory, same manifest object
    data = store.object_path(uri.split("#")[0].rsplit("/", 1)[1]).read_bytes()
    doc = json.loads(data)
    assert (doc["format"], doc["version"], doc["digest"]) == (FORMAT, VERSION, digest)
    names = [f["name"] for f in doc["files"]]
    assert names == sorted(p.name for p in model_dir.iterdir())
    for f in doc["files"]:
        p = model_dir / f["name"]
        assert (f["sha256"], f["size"]) == (sha256_of(p), p.stat().st_size)
    assert parse_manifest(data).digest == digest


def test_pull_round_and_latest(cli, registry, store, model_dir, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(model_dir, second)
    config = json.loads((second / "config.json").read_text())
    (second / "config.json").write_text(json.dumps({**config, "moesaic_test": 1}))
    d0, u0, _ = publish_dir(store, model_dir)
    d1, u1, _ = publish_dir(store, second)
    assert d0 != d1
    registry.publish(0, d0, u0)
    registry.publish(1, d1, u1)
    args = [*chain_args(registry), "--quiet"]
    rc, out, err = cli("checkpoint", "pull", *args, "--out", tmp_path / "latest")
    assert rc == 0 and f"digest  {d1}" in out, err
    rc, out, err = cli("checkpoint", "pull", *args, "--round", "0", "--out", tmp_path / "r0")
    assert rc == 0 and f"digest  {d0}" in out, err
    assert sha256_dir(tmp_path / "r0") == d0
    rc, out, err = cli("checkpoint", "pull", *args, "--round", "7", "--out", tmp_path / "r7")
    assert rc == 2 and "no checkpoint for round 7" in err and not (tmp_path / "r7").exists()


def test_list_and_pull_with_no_checkpoint(cli, registry, tmp_path):
    rc, out, _ = cli("checkpoint", "list", *chain_args(registry))
    assert rc == 0 and "no checkpoints published" in out
    rc, _, err = cli("checkpoint", "pull", *chain_args(registry), "--out", tmp_path / "x")
    assert rc == 2 and "no checkpoints published" in err


# ---------------------------------------------------------------------------- tampering


def _tamper(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "extend":
        data += b"\0" * 16
    path.write_bytes(data)


@pytest.mark.parametrize(
    "how, code",
    [("flip", "digest_mismatch"), ("truncate", "digest_mismatch"), ("extend", "too_large")],
)
def test_tampered_object_is_refused(how, code, cli, registry, store, model_dir, tmp_path):
    digest, uri, _ = publish_dir(store, model_dir)
    registry.publish(0, digest, uri)
    _tamper(store.object_path(sha256_of(model_dir / "model.safetensors")), how)
    out_dir = tmp_path / "pulled"
    rc, out, err = cli("checkpoint", "pull", *chain_args(registry), "--out", out_dir, "--quiet")
    assert rc == 2 and out == ""
    assert code in err and "'model.safetensors'" in err and "tampered" in err, err
    assert_nothing_left(tmp_path, out_dir)


def test_missing_object_is_refused(store, model_dir, tmp_path):
    digest, uri, _ = publish_dir(store, model_dir)
    store.delete(sha256_of(model_dir / "config.json"))
    with pytest.raises(StorageError, match="missing.*'config.json'") as e:
        pull(record(digest, uri), tmp_path / "out", max_bytes=MAX)
    assert e.value.code == "missing"
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_existing_out_dir_untouched(store, model_dir, tmp_path):
    digest, uri, _ = publish_dir(store, model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):  # refused before any download
        pull(record(digest, uri), out_dir, max_bytes=MAX)
    weights = store.object_path(sha256_of(model_dir / "model.safetensors"))
    _tamper(weights, "flip")
    with pytest.raises(StorageError, match="digest_mismatch"):
        pull(record(digest, uri), out_dir, max_bytes=MAX, overwrite=True)
    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    assert (out_dir / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # With intact objects, overwrite replaces the directory as a whole.
    shutil.copyfile(model_dir / "model.safetensors", weights)  # repair the stored object
    pull(record(digest, uri), out_dir, max_bytes=MAX, overwrite=True)
    assert not (out_dir / "keep.txt").exists() and sha256_dir(out_dir) == digest


# ---------------------------------------------------------------------------- lying manifests


def test_chain_digest_differs_from_manifest(cli, registry, store, model_dir, tmp_path):
    _, uri, _ = publish_dir(store, model_dir)
    registry.publish(0, sha("another checkpoint"), uri)
    out_dir = tmp_path / "pulled"
    rc, _, err = cli("checkpoint", "pull", *chain_args(registry), "--out", out_dir, "--quiet")
    assert rc == 2 and "digest mismatch" in err and sha("another checkpoint") in err, err
    assert_nothing_left(tmp_path, out_dir)


def _hand_made(store: FileStore, tmp_path: Path, doc: object) -> str:
    """Put a manifest's JSON bytes in the store; returns its uri."""
    path = tmp_path / "manifest.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return store.put(path).uri


def _real_doc(store: FileStore, model_dir: Path) -> dict:
    _, uri, _ = publish_dir(store, model_dir)
    return json.loads(store.object_path(uri.split("#")[0].rsplit("/", 1)[1]).read_bytes())


def test_listed_files_must_hash_to_the_digest(store, model_dir, tmp_path):
    """A manifest that carries the chain's digest but lists other weights is refused up front."""
    doc = _real_doc(store, model_dir)
    readme = next(f for f in doc["files"] if f["name"] == "README.md")
    weights = next(f for f in doc["files"] if f["name"] == "model.safetensors")
    weights.update(sha256=readme["sha256"], size=readme["size"])
    uri = _hand_made(store, tmp_path, doc)
    with pytest.raises(ValueError, match="lists hash to"):
        pull(record(doc["digest"], uri), tmp_path / "out", max_bytes=MAX)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_manifest_uri_must_match_its_bytes(store, model_dir, tmp_path):
    doc = _real_doc(store, model_dir)
    uri = _hand_made(store, tmp_path, doc)
    obj = store.object_path(uri.rsplit("/", 1)[1])
    obj.write_bytes(obj.read_bytes().replace(b'"version": 1', b'"version": 2'))
    with pytest.raises(StorageError, match="digest_mismatch"):
        pull(record(doc["digest"], uri), tmp_path / "out", max_bytes=MAX)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_size_cap(store, model_dir, tmp_path):
    digest, uri, total = publish_dir(store, model_dir)
    with pytest.raises(StorageError, match="too_large") as e:
        pull(record(digest, uri), tmp_path / "out", max_bytes=total - 1)
    assert e.value.code == "too_large"
    assert_nothing_left(tmp_path, tmp_path / "out")
    assert pull(record(digest, uri), tmp_path / "out", max_bytes=total).is_dir()


def _with_files(doc: dict, files: list[dict]) -> dict:
    return {**doc, "files": files}


def _bad_docs(doc: dict) -> dict[str, tuple[object, str]]:
    """Malformed manifests derived from a real one -> the error each must raise."""
    files = doc["files"]
    one = files[0]

    def named(name):  # one more entry, sorted in, that points at an existing object
        return _with_files(doc, sorted([*files, {**one, "name": name}], key=lambda f: f["name"]))

    return {
        "parent": (named("../evil"), "unsafe file name"),
        "absolute": (named("/tmp/evil"), "unsafe file name"),
        "nested": (named("sub/evil"), "unsafe file name"),
        "dotdot": (named(".."), "unsafe file name"),
        "dot": (named("."), "unsafe file name"),
        "empty": (named(""), "unsafe file name"),
        "backslash": (named("..\\evil"), "unsafe file name"),
        "control": (named("a\nb"), "unsafe file name"),
        "not text": (_with_files(doc, [*files[:-1], {**files[-1], "name": 7}]), "unsafe file name"),
        "duplicate": (_with_files(doc, [files[0], *files]), "duplicate"),
        "case duplicate": (named(one["name"].upper()), "duplicate"),
        "unsorted": (_with_files(doc, files[::-1]), "not sorted"),
        "format": ({**doc, "format": "other"}, "expected 'moesaic-checkpoint'"),
        "version": ({**doc, "version": 2}, "version"),
        "bool version": ({**doc, "version": True}, "version"),
        "extra key": ({**doc, "extra": 1}, "exactly format, version, digest, files"),
        "no files": (_with_files(doc, []), "files must be a list"),
        "negative size": (_with_files(doc, [{**one, "size": -1}, *files[1:]]), "bad size"),
        "bool size": (_with_files(doc, [{**one, "size": True}, *files[1:]]), "bad size"),
        "bad sha256": (
            _with_files(doc, [{**one, "sha256": "AB" * 32}, *files[1:]]),
            "64 lowercase",
        ),
        "not json": (b"\xff{not json", "not JSON"),
        "list": ([doc], "exactly format"),
    }


def test_malformed_manifests_are_refused(store, model_dir, tmp_path):
    doc = _real_doc(store, model_dir)
    for label, (bad, message) in _bad_docs(doc).items():
        uri = _hand_made(store, tmp_path, bad)
        out_dir = tmp_path / "out" / "ckpt"
        with pytest.raises(ValueError, match=message):
            pull(record(doc["digest"], uri), out_dir, max_bytes=MAX)
        assert_nothing_left(out_dir.parent, out_dir), label
    assert not (tmp_path / "evil").exists() and not (tmp_path / "out" / "evil").exists()
    assert not Path("/tmp/evil").exists()


def test_unsafe_name_via_cli(cli, registry, store, model_dir, tmp_path):
    doc = _real_doc(store, model_dir)
    files = sorted([*doc["files"], {**doc["files"][0], "name": "../evil"}], key=lambda f: f["name"])
    uri = _hand_made(store, tmp_path, _with_files(doc, files))
    registry.publish(0, doc["digest"], uri)
    out_dir = tmp_path / "pulled"
    rc, _, err = cli("checkpoint", "pull", *chain_args(registry), "--out", out_dir, "--quiet")
    assert rc == 2 and "unsafe file name" in err and "'../evil'" in err, err
    assert_nothing_left(tmp_path, out_dir)
    assert not (tmp_path / "evil").exists()


def test_uri_without_sha256_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not end with a sha256"):
        pull(record(sha("x"), "http://127.0.0.1:1/ckpt"), tmp_path / "out", max_bytes=MAX)
    assert_nothing_left(tmp_path, tmp_path / "out")


# ---------------------------------------------------------------------------- publishing


def test_publish_refuses_a_nested_directory(store, model_dir, tmp_path):
    nested = tmp_path / "nested"
    shutil.copytree(model_dir, nested)
    (nested / "sub").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        publish_dir(store, nested)


def test_publish_needs_weights_and_config(store, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights\n")
    with pytest.raises(FileNotFoundError):
        publish_dir(store, tmp_path / "empty")


def test_publish_cli_to_a_file_store(cli, model_dir, tmp_path):
    url = (tmp_path / "store").as_uri()
    rc, out, err = cli("checkpoint", "publish", model_dir, "--store", url, "--quiet")
    assert rc == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines())
    assert fields["digest"] == sha256_dir(model_dir)
    assert fields["uri"].startswith(url + "/objects/")
    pulled = pull(record(fields["digest"], fields["uri"]), tmp_path / "out", max_bytes=MAX)
    assert sha256_dir(pulled) == fields["digest"]
    assert open_store(url).exists(fields["uri"].split("#")[0].rsplit("/", 1)[1])


def test_expected_digest_matches_sha256_dir(model_dir):
    doc = parse_manifest(json.dumps(_manifest_of(model_dir)).encode())
    assert doc.digest == sha256_dir(model_dir)


def _manifest_of(path: Path) -> dict:
    from protocol.artifact.checkpoint import build_manifest, expected_digest

    m = build_manifest(path)
    # Every file (README, tokenizer ...) but the project's own provenance file.
    digested = sorted(p for p in path.iterdir() if p.name != "moesaic.json")
    assert (
        expected_digest(m.files)
        == m.digest
        == sha256_json([[p.name, sha256_of(p)] for p in digested])
    )
    return json.loads(m.to_json())


# ---------------------------------------------------------------------------- what the digest covers


def test_a_tokenizer_file_changes_the_checkpoint_hash(model_dir, tmp_path):
    """Every file a loader reads is part of the digest; the project's own side files are not."""
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    before = sha256_dir(copy)
    (copy / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    with_tokenizer = sha256_dir(copy)
    (copy / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')  # a swapped vocab
    assert len({before, with_tokenizer, sha256_dir(copy)}) == 3
    for name in ("generation_config.json", "model.safetensors.index.json", "chat_template.jinja"):
        again = sha256_dir(copy)
        (copy / name).write_text("{}")
        assert sha256_dir(copy) != again, name
    again = sha256_dir(copy)
    (copy / "moesaic_base.json").write_text('{"seconds": 12.3}')  # a build report: timings
    (copy / "moesaic.json").write_text('{"info": {"deltas": ["runs/miner0/d0"]}}')  # provenance
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert sha256_dir(copy) == again


@pytest.mark.parametrize("target", ["inside", "outside"])
def test_symlinks_in_a_checkpoint_directory_are_refused(model_dir, tmp_path, target, store):
    """A symlink's target can change after hashing, or lie outside the directory."""
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    elsewhere = tmp_path / "secret.txt"
    elsewhere.write_text("not part of the checkpoint")
    (copy / "tokenizer.json").symlink_to(copy / "config.json" if target == "inside" else elsewhere)
    with pytest.raises(ValueError, match="tokenizer.json is a symlink"):
        sha256_dir(copy)
    with pytest.raises(ValueError, match="symlink"):
        publish_dir(store, copy)


def test_pull_refuses_a_swapped_tokenizer_file(store, model_dir, tmp_path):
    """Attack: republish the chain's checkpoint with the same weights and config but another
    tokenizer (text encoded differently, a backdoored chat template), claiming the chain's
    digest. The tokenizer is in the digest, so the manifest is refused before any download."""
    honest = tmp_path / "honest"
    shutil.copytree(model_dir, honest)
    (honest / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    digest, uri, _ = publish_dir(store, honest)
    assert pull(record(digest, uri), tmp_path / "ok", max_bytes=MAX)  # the honest one pulls
    swapped = tmp_path / "swapped"
    shutil.copytree(honest, swapped)
    (swapped / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    doc = _real_doc(store, swapped)
    doc["digest"] = digest  # claims the chain's checkpoint
    with pytest.raises(ValueError, match="lists hash to"):
        pull(record(digest, _hand_made(store, tmp_path, doc)), tmp_path / "out", max_bytes=MAX)
    assert_nothing_left(tmp_path, tmp_path / "out")
