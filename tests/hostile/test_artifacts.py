"""Every hostile artifact class is refused twice, with its own code and without a crash.

Once by `moesaic artifact verify` (in process, exit 1 and "REJECTED <code>:" on stderr), and
once on the validator's path: the miner's signed manifest and the bytes go into a file store,
`fetch_submission` fetches them under the validator's expectations, and the validator's loader
(`validator.evaluate._sketch_all`, which calls `read_delta_untrusted` exactly as a round does)
turns the file into an `invalid` outcome naming the code. Anything other than DeltaRejected
escaping the reader fails the test. The corpus is derived from one real delta written by
`protocol.artifact.delta.write_delta` over the shared random Qwen3-MoE (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from protocol.chain import Commitment
from protocol.identity.hashing import canonical_json
from protocol.identity.keys import EthSigner
from protocol.round.manifest import SIGN_DOMAIN, evm_chain
from protocol.round.submissions import Expectations, Fetched, Rejected, fetch_submission
from protocol.storage.file import FileStore
from protocol.storage.transfer import RetryPolicy

from .conftest import MINER_KEY, ROUND, SHARD
from .corpus import CLASSES, PICKLE_SENTINEL, ArtifactClass

BLOCK, DEADLINE = 5, 10
CHAIN = evm_chain(31337, "0x" + "11" * 20)
# Every DeltaRejected code read_delta_untrusted can give for a file's content.
READER_CODES = {
    "truncated", "header_size", "header_json", "duplicate_key", "metadata", "assignment_hash",
    "base_hash", "round", "unexpected_key", "missing_key", "dtype", "shape", "offsets",
    "nonfinite", "magnitude", "too_large", "sha256", "safetensors", "scale", "rank", "zero",
    "wrong_shard",
}  # fmt: skip
# The classes issue 6 names, by their corpus names.
REQUIRED = {
    "truncated_in_data", "header_length_beyond_file", "oversized_header", "header_not_json",
    "duplicate_tensor_key", "overlapping_offsets", "out_of_bounds_offsets", "wrong_dtype",
    "wrong_shape", "expert_outside_assignment", "missing_assigned_expert",
    "extra_attention_tensor", "extra_router_tensor", "extra_embedding_tensor", "nan_value",
    "inf_value", "huge_value", "pickle_disguised", "zip_disguised", "wrong_base_hash",
    "wrong_assignment_hash", "wrong_round", "wrong_format_version", "larger_than_cap",
    "zero_byte_file", "metadata_value_not_string", "missing_metadata", "negative_offsets",
    "data_gap", "trailing_garbage", "homoglyph_key", "wrong_shard",
}  # fmt: skip


@pytest.fixture(autouse=True)
def no_sentinel():
    """Fail any test after which the malicious pickle's side effect exists: it was unpickled."""
    if PICKLE_SENTINEL.exists():
        PICKLE_SENTINEL.rmdir()
    yield
    assert not PICKLE_SENTINEL.exists(), "a pickle in a hostile artifact was executed"


def verify_cli(world, path: Path, capsys, *extra: str) -> tuple[int, str, str]:
    from moesaic.cli import main

    argv = ["artifact", "verify", str(path), "--assignment", str(world["assignment_path"])]
    argv += ["--base", str(world["base"]), "--round", str(ROUND)]
    rc = main([*argv, "--hotkey", EthSigner(MINER_KEY).identity, "--task-id", "0", *extra])
    got = capsys.readouterr()
    return rc, got.out, got.err


# ---------------------------------------------------------------------------- the corpus


def test_corpus_has_the_required_classes():
    names = [c.name for c in CLASSES]
    assert len(names) >= 25
    assert len(set(names)) == len(names), "class names must be unique"
    assert set(names) >= REQUIRED, sorted(REQUIRED - set(names))
    assert {c.code for c in CLASSES} <= READER_CODES
    assert all(c.threat for c in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_builder_is_deterministic_and_changes_the_file(world, cls: ArtifactClass):
    valid = world["valid"]
    data = cls.build(valid)
    assert isinstance(data, bytes)
    assert data != valid.data
    assert cls.build(valid) == data  # the same corpus on every run and every machine


def test_the_valid_delta_passes_both_paths(world, capsys, tmp_path):
    """The control: without its defect, each class's source file is accepted everywhere."""
    valid = world["valid"]
    path = tmp_path / "valid.safetensors"
    path.write_bytes(valid.data)
    rc, out, err = verify_cli(world, path, capsys, "--sha256", valid.sha256)
    assert (rc, err) == (0, "")
    assert out.startswith(f"OK {valid.sha256} experts=5 ")
    got = fetch(world, tmp_path, valid.data)
    assert isinstance(got, Fetched), got
    valid_map, _, rejected = validator_read(world, got)
    assert rejected == {}
    import torch

    from protocol.artifact.sketch import signature

    # The accepted file's sketch covers exactly the assigned experts' keys and shapes.
    shapes = {k: torch.empty(world["layout"].proj_shape(k.split(".")[-2])) for k in valid.keys}
    assert valid_map[got.hotkey].signature == signature(shapes)


# ---------------------------------------------------------------------------- path 1: the CLI


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_cli_rejects(world, cls: ArtifactClass, capsys, tmp_path):
    valid = world["valid"]
    path = tmp_path / "delta.safetensors"
    path.write_bytes(cls.build(valid))
    extra = ("--sha256", valid.sha256) if cls.claims_valid_sha else ()
    rc, out, err = verify_cli(world, path, capsys, *extra)
    assert rc == 1
    assert out == ""
    assert err.startswith(f"REJECTED {cls.code}: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------- path 2: validator


def signed_manifest(fields: dict, signer: EthSigner) -> bytes:
    """A signed manifest written field by field, as a hostile miner can: `Manifest` itself
    refuses some values (a 0-byte artifact), a forger's JSON does not have to."""
    body = canonical_json(fields)
    signature = signer.sign(SIGN_DOMAIN + body)
    return canonical_json({"manifest": fields, "signature": signature})


def fetch(world, tmp_path: Path, data: bytes, *, claims_valid_sha: bool = False):
    """Upload `data` and its manifest as a miner, then fetch as a validator would."""
    valid = world["valid"]
    store = FileStore(tmp_path / "store", retry=RetryPolicy(attempts=1))
    upload = tmp_path / "upload.safetensors"
    if claims_valid_sha:
        # The miner commits to the valid bytes, then the stored object is swapped under that
        # digest (a compromised store or an object rewritten in place).
        upload.write_bytes(valid.data)
        ref = store.put(upload)
        store.object_path(ref.sha256).write_bytes(data)
        sha, size = ref.sha256, len(valid.data)
    else:
        upload.write_bytes(data)
        ref = store.put(upload)
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    signer = EthSigner(MINER_KEY)
    fields = dict(
        chain=CHAIN,
        round=ROUND,
        task_id=0,
        base_hash=world["base_hash"],
        assignment_hash=world["assignment"].hash(),
        artifact_sha256=sha,
        artifact_size=size,
        uri=ref.uri,
        hotkey=signer.identity,
        tokens=1000,
        encoding="float32",
        format="moesaic-manifest",
        version=1,
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(signed_manifest(fields, signer))
    digest = store.put(manifest).sha256
    expect = Expectations(
        chain=CHAIN,
        task_id=0,
        base_hash=world["base_hash"],
        assignment_hash=world["assignment"].hash(),
        registered_hotkeys=[signer.identity],
        deadline_block=DEADLINE,
        max_artifact_bytes=valid.cap,
    )
    commitment = Commitment(signer.identity, ROUND, digest, BLOCK)
    return fetch_submission(store, commitment, expect, dest_dir=tmp_path / "fetched")


def validator_read(world, got: Fetched):
    """The validator's loader over one fetched file, with a round's expectations."""
    from protocol.artifact.fingerprint import BaseExperts
    from protocol.round.scoring import Entry
    from validator.evaluate import _sketch_all

    return _sketch_all(
        {got.hotkey: got.artifact_path},
        {got.hotkey: Entry(got.hotkey, got.artifact_sha256, BLOCK)},
        b"validator secret",
        BaseExperts(world["model"], world["layout"]),
        {got.hotkey: SHARD},
        layout=world["layout"],
        assignment=world["assignment"],
        max_bytes=world["valid"].cap,
        expected_base_hash=world["base_hash"],
        expected_round=ROUND,
    )


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.name)
def test_validator_rejects(world, cls: ArtifactClass, tmp_path):
    from protocol.round.scoring import INVALID

    got = fetch(world, tmp_path, cls.build(world["valid"]), claims_valid_sha=cls.claims_valid_sha)
    if cls.fetch_code is not None:
        assert isinstance(got, Rejected), got
        assert got.code == cls.fetch_code, got
        # Refused before the artifact was written where the validator would read it.
        assert not list((tmp_path / "fetched").glob("*.safetensors"))
        return
    assert isinstance(got, Fetched), got
    valid, prints, rejected = validator_read(world, got)  # only DeltaRejected is caught in there
    assert valid == {} and prints == {}
    outcome = rejected[got.hotkey]
    assert outcome.rejection == cls.code, outcome.reason
    assert outcome.code == INVALID and outcome.value == 0.0
    assert outcome.reason.startswith(f"delta rejected ({cls.code}): ")


def test_fetch_rejections_name_their_cause(world, tmp_path):
    """The classes refused before reading say why: a forged 0-byte claim, an oversized claim,
    bytes that do not hash to the committed digest."""
    reasons = {}
    for cls in CLASSES:
        if cls.fetch_code is None:
            continue
        sub = tmp_path / cls.name
        got = fetch(world, sub, cls.build(world["valid"]), claims_valid_sha=cls.claims_valid_sha)
        reasons[cls.name] = (got.rejection, got.reason)
    assert reasons["zero_byte_file"][0] == "malformed"
    assert "artifact_size" in reasons["zero_byte_file"][1]
    assert reasons["larger_than_cap"][0] == "too_large"
    assert reasons["sha256_mismatch"][1].startswith("artifact not fetched")


def test_cli_inspect_never_crashes(world, capsys, tmp_path):
    """`moesaic artifact inspect` reads every class too: exit 0 or 1, never an exception."""
    from moesaic.cli import main

    for cls in CLASSES:
        path = tmp_path / f"{cls.name}.safetensors"
        path.write_bytes(cls.build(world["valid"]))
        rc = main(["artifact", "inspect", str(path)])
        out, err = capsys.readouterr()
        assert rc in (0, 1), (cls.name, rc, err)
        assert rc == 0 or err.startswith("REJECTED "), (cls.name, err)
        # Hostile keys come out escaped: no terminal control codes, nothing unencodable.
        assert "\x1b" not in out + err, cls.name
        (out + err).encode("utf-8")


def test_cli_inspect_escapes_hostile_keys(world, capsys, tmp_path):
    from moesaic.cli import main

    from .corpus import by_name

    for name, shown in [("terminal_escape_key", "\\x1b[2J"), ("lone_surrogate_key", "\\ud800")]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(by_name()[name].build(world["valid"]))
        assert main(["artifact", "inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert shown in out, out


def test_rejection_messages_are_printable(world):
    """Every rejection message survives a strict UTF-8 encode (log files, JSON state)."""
    from protocol.artifact.delta import DeltaRejected
    from protocol.artifact.untrusted import read_delta_untrusted

    path = world["root"] / "printable.safetensors"
    for cls in CLASSES:
        path.write_bytes(cls.build(world["valid"]))
        kw = {"expected_sha256": world["valid"].sha256} if cls.claims_valid_sha else {}
        with pytest.raises(DeltaRejected) as info:
            read_delta_untrusted(
                path,
                layout=world["layout"],
                assignment=world["assignment"],
                max_bytes=world["valid"].cap,
                expected_base_hash=world["base_hash"],
                expected_round=ROUND,
                expected_shard=SHARD,
                **kw,
            )
        assert info.value.code == cls.code
        info.value.message.encode("utf-8")
        json.dumps({"reason": info.value.message}, ensure_ascii=False).encode("utf-8")
