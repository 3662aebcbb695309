"""protocol.artifact.delta: writing, hostile-file loading, applying and reverting expert deltas.

Hostile files are crafted as raw bytes (8-byte little-endian header length + JSON + data) so
each check of `read_delta_untrusted` is exercised on exactly the defect it guards against.
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import replace

import pytest
import torch

from protocol.artifact.delta import (
    DeltaMeta,
    DeltaRejected,
    apply_delta,
    delta_norms,
    expert_keys,
    extract_delta,
    flatten,
    max_delta_bytes,
    parse_expert_key,
    snapshot_experts,
    write_delta,
)
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.identity.hashing import sha256_dir, sha256_file
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, fused_experts, load_model
from protocol.round.shards import shard_key

MINER = "0x" + "ab" * 20
SHARD = shard_key(0, MINER, 3)  # the shard the test deltas declare (task 0, round 3)

# --- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def layout(random_moe_dir):
    return expert_layout(load_model(random_moe_dir))


@pytest.fixture(scope="module")
def base_hash(random_moe_dir):
    return sha256_dir(random_moe_dir)


@pytest.fixture
def model(random_moe_dir):
    return load_model(random_moe_dir)


@pytest.fixture
def meta(random_assignment, base_hash):
    return DeltaMeta(
        base_hash=base_hash,
        assignment_hash=random_assignment.hash(),
        round=3,
        tokens=1000,
        shard=SHARD,
    )


def random_delta(layout, assignment, *, seed=0, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(layout.proj_shape(parse_expert_key(key)[3]), generator=g) * scale
        for key in expert_keys(layout, assignment)
    }


@pytest.fixture
def delta(layout, random_assignment):
    return random_delta(layout, random_assignment)


@pytest.fixture
def good(tmp_path, delta, meta):
    """Bytes of a valid delta for random_assignment."""
    path = tmp_path / "good.safetensors"
    write_delta(path, delta, meta)
    return path.read_bytes()


def read(path, layout, assignment, **kw):
    kw.setdefault("max_bytes", max_delta_bytes(layout, assignment))
    return read_delta_untrusted(path, layout=layout, assignment=assignment, **kw)


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a well-formed file."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def pack(header, body: bytes = b"", *, header_len: int | None = None) -> bytes:
    """Raw safetensors bytes from a header (dict, str or bytes) and a data section."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if header_len is None else header_len
    return n.to_bytes(8, "little") + raw + body


def mutate(data: bytes, fn) -> bytes:
    header, body = split(data)
    fn(header)
    return pack(header, body)


def with_meta(data: bytes, **changes) -> bytes:
    def fn(header):
        fields = json.loads(header["__metadata__"]["moesaic"])
        header["__metadata__"]["moesaic"] = json.dumps({**fields, **changes})

    return mutate(data, fn)


def poke(data: bytes, key: str, value: float) -> bytes:
    """Overwrite the first float32 element of `key` with `value`."""
    header, body = split(data)
    begin = header[key]["data_offsets"][0]
    body = body[:begin] + struct.pack("<f", value) + body[begin + 4 :]
    return pack(header, body)


def first_key(layout, assignment) -> str:
    return expert_keys(layout, assignment)[0]


def assert_rejected(tmp_path, data, layout, assignment, code, *, match=None, **kw):
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(data)
    with pytest.raises(DeltaRejected) as info:
        read(path, layout, assignment, **kw)
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    if match is not None:
        assert match in str(info.value)
    return info.value


# --- metadata ---------------------------------------------------------------------------------


def test_meta_json_round_trip(meta):
    text = meta.to_json()
    assert DeltaMeta.from_json(text) == meta
    assert json.loads(text)["format"] == "moesaic-delta"
    assert json.loads(text)["format_version"] == 2
    assert json.loads(text)["shard"] == SHARD


@pytest.mark.parametrize(
    "change",
    [
        {"format_version": 1},
        {"format_version": 3},
        {"format_version": True},
        {"format": "other"},
        {"encoding": "float64"},
        {"round": -1},
        {"tokens": 1.5},
        {"base_hash": "abc"},
        {"shard": SHARD.upper()},
        {"shard": SHARD[:-1]},
        {"shard": None},
        {"extra": 1},
    ],
)
def test_meta_validation(meta, change):
    fields = {**json.loads(meta.to_json()), **change}
    with pytest.raises(ValueError):
        DeltaMeta.from_json(json.dumps(fields))


# --- writing and reading back -----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "float16"])
def test_round_trip(tmp_path, layout, random_assignment, delta, meta, encoding):
    meta = DeltaMeta(**{**json.loads(meta.to_json()), "encoding": encoding})
    path = tmp_path / "d.safetensors"
    sha = write_delta(path, delta, meta)
    assert sha == sha256_file(path)
    got_meta, got = read(path, layout, random_assignment, expected_sha256=sha, expected_round=3)
    assert got_meta == meta
    assert list(got) == expert_keys(layout, random_assignment)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        encoding
    ]
    for key, t in delta.items():
        # Dense encodings come back as stored: no widened copy in the validator's memory.
        assert got[key].dtype == dtype
        assert torch.equal(got[key], t.to(dtype))


def test_bytes_are_stable(tmp_path, delta, meta):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sha_a = write_delta(a, delta, meta)
    reordered = dict(reversed(list(delta.items())))
    sha_b = write_delta(b, reordered, meta)
    assert sha_a == sha_b
    assert a.read_bytes() == b.read_bytes()
    # Different content must give a different digest.
    changed = {**delta, next(iter(delta)): next(iter(delta.values())) + 1}
    assert write_delta(tmp_path / "c.safetensors", changed, meta) != sha_a


def test_file_holds_only_assigned_experts(good, layout, random_assignment):
    header, body = split(good)
    assert header["__metadata__"].keys() == {"moesaic"}
    names = sorted(k for k in header if k != "__metadata__")
    assert names == sorted(expert_keys(layout, random_assignment))
    assert "model.layers.0.mlp.experts.1.gate_proj.weight" in names
    assert len(body) == random_assignment.num_selected() * layout.params_per_expert() * 4


def test_write_refuses_nonfinite(tmp_path, delta, meta):
    bad = {**delta, next(iter(delta)): torch.full((16, 32), float("nan"))}
    with pytest.raises(ValueError, match="non-finite"):
        write_delta(tmp_path / "x.safetensors", bad, meta)
    assert not (tmp_path / "x.safetensors").exists()


# --- hostile files: container -----------------------------------------------------------------


def test_zero_byte_file(tmp_path, layout, random_assignment):
    assert_rejected(tmp_path, b"", layout, random_assignment, "truncated")


def test_truncated_before_header(tmp_path, good, layout, random_assignment):
    assert_rejected(tmp_path, good[:5], layout, random_assignment, "truncated")


def test_truncated_inside_header(tmp_path, good, layout, random_assignment):
    assert_rejected(tmp_path, good[:40], layout, random_assignment, "header_size")


def test_truncated_data(tmp_path, good, layout, random_assignment):
    assert_rejected(tmp_path, good[:-10], layout, random_assignment, "offsets")


def test_header_length_beyond_file(tmp_path, good, layout, random_assignment):
    header, body = split(good)
    raw = json.dumps(header).encode()
    data = pack(raw, body, header_len=len(raw) + len(body) + 1)
    assert_rejected(tmp_path, data, layout, random_assignment, "header_size")


def test_header_length_huge(tmp_path, layout, random_assignment):
    data = (2**63).to_bytes(8, "little") + b"{}" * 10
    assert_rejected(tmp_path, data, layout, random_assignment, "header_size")


@pytest.mark.parametrize(
    "raw",
    [b"this is not json", b'{"a": 1', b"\xff\xfe{}", b"[1, 2, 3]", b'{"x": NaN}', b"[" * 5000],
)
def test_bad_header_json(tmp_path, layout, random_assignment, raw):
    assert_rejected(tmp_path, pack(raw), layout, random_assignment, "header_json")


def test_duplicate_keys(tmp_path, good, layout, random_assignment):
    header, body = split(good)
    key = first_key(layout, random_assignment)
    items = [*header.items(), (key, header[key])]
    raw = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in items) + "}"
    assert_rejected(
        tmp_path, pack(raw, body), layout, random_assignment, "duplicate_key", match=key
    )


def test_pickle_disguised_as_safetensors(tmp_path, layout, random_assignment):
    torch_file = tmp_path / "t.pt"
    torch.save({"w": torch.zeros(3)}, torch_file)
    err = assert_rejected(
        tmp_path, torch_file.read_bytes(), layout, random_assignment, "header_size"
    )
    assert "header length" in str(err)


class _Payload:
    """Unpickling this creates a marker file: proof that something unpickled the input."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_never_unpickled(tmp_path, layout, random_assignment):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker), protocol=2)
    for data in (payload, pack(payload)):
        with pytest.raises(DeltaRejected):
            path = tmp_path / "evil.safetensors"
            path.write_bytes(data)
            read(path, layout, random_assignment)
    assert not marker.exists()


def test_too_large(tmp_path, good, layout, random_assignment):
    err = assert_rejected(
        tmp_path, good, layout, random_assignment, "too_large", max_bytes=len(good) - 1
    )
    assert str(len(good)) in str(err)


def test_trailing_bytes(tmp_path, good, layout, random_assignment):
    assert_rejected(
        tmp_path, good + b"\0" * 8, layout, random_assignment, "offsets", match="trailing"
    )


def test_directory_is_not_a_file(tmp_path, layout, random_assignment):
    with pytest.raises(DeltaRejected) as info:
        read(tmp_path, layout, random_assignment)
    assert info.value.code == "not_file"


def test_missing_file_is_file_not_found(tmp_path, layout, random_assignment):
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nope.safetensors", layout, random_assignment)


# --- hostile files: metadata ------------------------------------------------------------------


def test_wrong_assignment_hash(tmp_path, good, layout, random_assignment, random_moe_dir):
    other = Assignment({0: (1, 5), 1: (0, 2, 6)}, "token-ratio", 0.2, sha256_dir(random_moe_dir), 8)
    assert_rejected(tmp_path, good, layout, other, "assignment_hash", match=other.hash())


def test_wrong_base_hash(tmp_path, good, layout, random_assignment):
    assert_rejected(
        tmp_path, good, layout, random_assignment, "base_hash", expected_base_hash="0" * 64
    )


def test_wrong_round(tmp_path, good, layout, random_assignment):
    assert_rejected(tmp_path, good, layout, random_assignment, "round", match="4", expected_round=4)


def test_the_committers_shard_is_accepted_and_any_other_is_wrong_shard(
    tmp_path, good, layout, random_assignment
):
    path = tmp_path / "good.safetensors"
    path.write_bytes(good)
    meta, _ = read(path, layout, random_assignment, expected_round=3, expected_shard=SHARD)
    assert meta.shard == SHARD
    # Another miner's shard of the round, and this miner's shard of the round before.
    for other in (shard_key(0, "0x" + "cd" * 20, 3), shard_key(0, MINER, 2)):
        e = assert_rejected(
            tmp_path, good, layout, random_assignment, "wrong_shard", expected_shard=other
        )
        assert SHARD[:16] in e.message and other[:16] in e.message  # both keys' prefixes


@pytest.mark.parametrize(
    "change",
    [
        {"format_version": 3},
        {"format": "safetensors"},
        {"encoding": "int4"},
        {"tokens": -5},
        {"x": 1},
    ],
)
def test_bad_metadata_fields(tmp_path, good, layout, random_assignment, change):
    assert_rejected(tmp_path, with_meta(good, **change), layout, random_assignment, "metadata")


@pytest.mark.parametrize(
    "metadata",
    [None, {}, {"moesaic": "not json"}, {"moesaic": "[]"}, "x", {"moesaic": "{}", "extra": "y"}],
)
def test_bad_metadata_container(tmp_path, good, layout, random_assignment, metadata):
    def fn(header):
        if metadata is None:
            del header["__metadata__"]
        else:
            header["__metadata__"] = metadata

    assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "metadata")


# --- hostile files: tensor entries ------------------------------------------------------------


def test_overlapping_offsets(tmp_path, good, layout, random_assignment):
    keys = expert_keys(layout, random_assignment)

    def fn(header):
        header[keys[1]]["data_offsets"] = header[keys[0]]["data_offsets"]

    assert_rejected(
        tmp_path, mutate(good, fn), layout, random_assignment, "offsets", match="overlaps"
    )


@pytest.mark.parametrize(
    "offsets", [[0.0, 2048.0], [True, 2048], "0-2048", [0], [-4, 2044], [0, 4]]
)
def test_malformed_offsets(tmp_path, good, layout, random_assignment, offsets):
    key = first_key(layout, random_assignment)

    def fn(header):
        header[key]["data_offsets"] = offsets

    assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "offsets", match=key)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64", "I32", "U8"])
def test_wrong_dtype(tmp_path, good, layout, random_assignment, dtype):
    key = first_key(layout, random_assignment)

    def fn(header):
        header[key]["dtype"] = dtype

    assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "dtype", match=key)


@pytest.mark.parametrize("shape", [[32, 16], [512], [16, 32, 1], [16, "32"], [16, 31]])
def test_wrong_shape(tmp_path, good, layout, random_assignment, shape):
    key = first_key(layout, random_assignment)  # gate_proj: [16, 32]

    def fn(header):
        header[key]["shape"] = shape

    assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "shape", match=key)


def test_extra_entry_field(tmp_path, good, layout, random_assignment):
    key = first_key(layout, random_assignment)

    def fn(header):
        header[key]["note"] = "hi"

    assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "header_json", match=key)


def test_expert_outside_assignment(tmp_path, good, layout, random_assignment):
    key = first_key(layout, random_assignment)
    outside = layout.expert_key(0, 3, "gate_proj")

    def fn(header):
        header[outside] = header.pop(key)

    err = assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "unexpected_key")
    assert outside in str(err) and "not in the assignment" in str(err)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
    ],
)
def test_non_expert_key(tmp_path, good, layout, random_assignment, name):
    def fn(header):
        header[name] = {"dtype": "F32", "shape": [8, 32], "data_offsets": [0, 1024]}

    err = assert_rejected(tmp_path, mutate(good, fn), layout, random_assignment, "unexpected_key")
    assert name in str(err)


def test_missing_expert(tmp_path, delta, meta, layout, random_assignment):
    dropped = layout.expert_key(1, 7, "down_proj")
    path = tmp_path / "d.safetensors"
    write_delta(path, {k: v for k, v in delta.items() if k != dropped}, meta)
    assert_rejected(
        tmp_path, path.read_bytes(), layout, random_assignment, "missing_key", match=dropped
    )


# --- hostile files: values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (float("nan"), "nonfinite"),
        (float("inf"), "nonfinite"),
        (-float("inf"), "nonfinite"),
        (1e6, "magnitude"),
    ],
)
def test_bad_values(tmp_path, good, layout, random_assignment, value, code):
    key = expert_keys(layout, random_assignment)[-1]
    assert_rejected(tmp_path, poke(good, key, value), layout, random_assignment, code, match=key)


def test_magnitude_cap_is_a_parameter(tmp_path, good, layout, random_assignment):
    key = first_key(layout, random_assignment)
    data = poke(good, key, 50.0)
    assert_rejected(tmp_path, data, layout, random_assignment, "magnitude", max_abs=10.0)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(data)
    _, tensors = read(path, layout, random_assignment)  # default cap 1e3 lets 50 through
    assert tensors[key].flatten()[0] == 50.0


@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "int8", "lowrank4", "lowrank4-int8"])
def test_an_all_zero_delta_is_rejected_as_zero(
    tmp_path, delta, meta, layout, random_assignment, encoding
):
    """An all-zero delta changes nothing: refused in every encoding, lazily read or not; one
    nonzero value anywhere (here the last projection's last) is enough to be read."""
    zeros = {k: torch.zeros_like(t) for k, t in delta.items()}
    path = tmp_path / "zero.safetensors"
    write_delta(path, zeros, replace(meta, encoding=encoding))
    for lazy in (False, True):
        with pytest.raises(DeltaRejected, match="every decoded value is zero") as e:
            read(path, layout, random_assignment, lazy=lazy)
        assert e.value.code == "zero"
    last = list(zeros)[-1]
    zeros[last].view(-1)[-1] = 0.5
    write_delta(path, zeros, replace(meta, encoding=encoding))
    read(path, layout, random_assignment)


def test_sha256_mismatch(tmp_path, good, layout, random_assignment):
    import hashlib

    flipped = bytearray(good)
    flipped[-3] ^= 0x01
    assert_rejected(
        tmp_path,
        bytes(flipped),
        layout,
        random_assignment,
        "sha256",
        expected_sha256=hashlib.sha256(good).hexdigest(),
    )


# --- producing and applying against a model ---------------------------------------------------


def expert_changed(before, after, layout, layer, e) -> bool:
    prefix = f"{layout.prefix}.{layer}.mlp.experts."
    gu, dn = prefix + "gate_up_proj", prefix + "down_proj"
    return not (
        torch.equal(before[gu][e], after[gu][e]) and torch.equal(before[dn][e], after[dn][e])
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_then_revert_is_bit_exact(random_moe_dir, layout, delta, dtype):
    model = load_model(random_moe_dir, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_delta(model, layout, delta, scale=0.7)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    applied.revert()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    applied.revert()  # idempotent
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_touches_exactly_the_assigned_experts(model, layout, random_assignment, delta):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_delta(model, layout, delta)
    after = model.state_dict()
    assigned = set(random_assignment.pairs())
    assert applied.experts == sorted(assigned)
    for layer in layout.moe_layers:
        for e in range(layout.num_experts):
            assert expert_changed(before, after, layout, layer, e) == ((layer, e) in assigned)
    expert_params = {k for k in before if ".mlp.experts." in k}
    for k in before.keys() - expert_params:
        assert torch.equal(before[k], after[k]), k
    # Values: base + delta, per projection.
    snap = snapshot_experts(model, layout, random_assignment)
    gate_up = before[f"{layout.prefix}.0.mlp.experts.gate_up_proj"]
    assert torch.equal(
        snap[layout.expert_key(0, 5, "up_proj")],
        gate_up[5, 16:] + delta[layout.expert_key(0, 5, "up_proj")],
    )


def test_apply_as_context_manager_and_scale(model, layout, delta):
    gate_up, _ = fused_experts(model, layout, 1)
    base = gate_up.detach().clone()
    key = layout.expert_key(1, 2, "gate_proj")
    with apply_delta(model, layout, delta, scale=0.5) as applied:
        assert applied.active
        assert torch.allclose(gate_up[2, :16], base[2, :16] + 0.5 * delta[key])
    assert torch.equal(gate_up, base)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("model.layers.0.mlp.gate.weight", (8, 32)),
        ("model.layers.5.mlp.experts.1.gate_proj.weight", (16, 32)),
        ("model.layers.0.mlp.experts.8.gate_proj.weight", (16, 32)),
        ("model.layers.0.mlp.experts.1.gate_proj.weight", (32, 16)),
    ],
)
def test_apply_refuses_bad_keys_without_modifying(model, layout, delta, key, shape):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        apply_delta(model, layout, {**delta, key: torch.ones(shape)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_snapshot_extract_write_read_apply(
    tmp_path, random_moe_dir, layout, random_assignment, meta
):
    trained = load_model(random_moe_dir)
    base_state = snapshot_experts(trained, layout, random_assignment)
    change = random_delta(layout, random_assignment, seed=1)
    apply_delta(trained, layout, change)  # stands in for training
    extracted = extract_delta(trained, layout, random_assignment, base_state)
    assert extracted.keys() == base_state.keys()
    for key in change:
        assert torch.allclose(extracted[key], change[key], atol=1e-6)
    path = tmp_path / "d.safetensors"
    write_delta(path, extracted, meta)
    _, loaded = read(path, layout, random_assignment)
    fresh = load_model(random_moe_dir)
    apply_delta(fresh, layout, loaded)
    for key, value in snapshot_experts(trained, layout, random_assignment).items():
        assert torch.allclose(
            snapshot_experts(fresh, layout, random_assignment)[key], value, atol=1e-6
        )


def test_snapshot_is_a_copy(model, layout, random_assignment):
    snap = snapshot_experts(model, layout, random_assignment)
    key = layout.expert_key(0, 1, "down_proj")
    kept = snap[key].clone()
    fused_experts(model, layout, 0)[1].data[1] += 1.0
    assert torch.equal(snap[key], kept)


def test_flatten_and_norms(delta):
    flat = flatten(delta)
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == sum(t.numel() for t in delta.values())
    first = sorted(delta)[0]
    assert torch.equal(flat[: delta[first].numel()], delta[first].reshape(-1))
    assert torch.equal(flatten(dict(reversed(list(delta.items())))), flat)
    norms = delta_norms(delta)
    assert list(norms) == sorted(delta)
    assert norms[first] == pytest.approx(float(delta[first].norm()))


# --- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli_files(tmp_path, delta, meta, random_assignment):
    assignment_path = tmp_path / "assignment.json"
    random_assignment.save(assignment_path)
    path = tmp_path / "delta.safetensors"
    sha = write_delta(path, delta, meta)
    return path, assignment_path, sha


def test_cli_verify_good(cli_files, random_moe_dir, capsys):
    from moesaic.cli import main

    path, assignment_path, sha = cli_files
    argv = ["artifact", "verify", str(path), "--assignment", str(assignment_path)]
    rc = main([*argv, "--base", str(random_moe_dir), "--round", "3", "--sha256", sha])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip() == f"OK {sha} experts=5 bytes={path.stat().st_size} round=3"


def test_cli_verify_tampered_bytes(cli_files, random_moe_dir, capsys):
    from moesaic.cli import main

    path, assignment_path, sha = cli_files
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    argv = [
        "artifact",
        "verify",
        str(path),
        "--assignment",
        str(assignment_path),
        "--base",
        str(random_moe_dir),
    ]
    assert main([*argv, "--sha256", sha]) == 1
    assert capsys.readouterr().err.startswith("REJECTED sha256:")


def test_cli_verify_nan_and_wrong_round(
    cli_files, random_moe_dir, layout, random_assignment, capsys
):
    from moesaic.cli import main

    path, assignment_path, _ = cli_files
    argv = [
        "artifact",
        "verify",
        str(path),
        "--assignment",
        str(assignment_path),
        "--base",
        str(random_moe_dir),
    ]
    assert main([*argv, "--round", "9"]) == 1
    assert capsys.readouterr().err.startswith("REJECTED round:")
    path.write_bytes(poke(path.read_bytes(), first_key(layout, random_assignment), float("nan")))
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("REJECTED nonfinite:")


def test_cli_verify_missing_inputs(cli_files, random_moe_dir, tmp_path, capsys):
    from moesaic.cli import main

    path, assignment_path, _ = cli_files
    base = ["--base", str(random_moe_dir)]
    assert (
        main(["artifact", "verify", str(path), "--assignment", str(tmp_path / "no.json"), *base])
        == 2
    )
    assert "no.json" in capsys.readouterr().err
    assert (
        main(
            [
                "artifact",
                "verify",
                str(tmp_path / "no.st"),
                "--assignment",
                str(assignment_path),
                *base,
            ]
        )
        == 2
    )
    assert "no.st" in capsys.readouterr().err


def test_cli_inspect(cli_files, capsys):
    from moesaic.cli import main

    path, _, _ = cli_files
    assert main(["artifact", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "round: 3" in out
    assert "layer 0: 2 experts: 1 5" in out
    assert "layer 1: 3 experts: 0 2 7" in out


# --- lazy reads: a compressed delta held as its wire tensors -----------------------------------


@pytest.mark.parametrize("encoding", ["bfloat16", "int8", "lowrank4", "lowrank4-int8"])
def test_lazy_read_holds_the_wire_and_decodes_what_the_dense_read_gives(
    tmp_path, model, layout, random_assignment, delta, meta, encoding
):
    from dataclasses import replace

    from protocol.artifact.delta import WireDelta, delta_shapes, held_bytes
    from protocol.artifact.sketch import sketch

    path = tmp_path / "d.safetensors"
    write_delta(path, delta, replace(meta, encoding=encoding))
    _, dense = read(path, layout, random_assignment)
    _, lazy = read(path, layout, random_assignment, lazy=True)
    assert list(lazy) == list(dense) and len(lazy) == len(dense)
    assert delta_shapes(lazy) == delta_shapes(dense)
    if encoding == "bfloat16":  # stored dense: nothing to decode, the tensors themselves
        assert not isinstance(lazy, WireDelta)
    else:
        assert isinstance(lazy, WireDelta)
        assert held_bytes(lazy) < held_bytes(dense)  # the wire, not float32
        assert held_bytes(lazy) <= path.stat().st_size
    for key in dense:
        assert torch.equal(lazy[key], dense[key]), key
    assert torch.equal(sketch(lazy, secret=b"s").vector, sketch(dense, secret=b"s").vector)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_delta(model, layout, dense):
        want = {k: v.clone() for k, v in model.state_dict().items()}
    with apply_delta(model, layout, lazy):
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_wire_delta_refuses_dense_encodings_and_unknown_keys(layout, random_assignment):
    from protocol.artifact.delta import WireDelta
    from protocol.artifact.encodings import parse_encoding

    with pytest.raises(ValueError, match="stored dense"):
        WireDelta({}, parse_encoding("float16"), {})
    wire = WireDelta({}, parse_encoding("int8"), {"k": (2, 3)})
    with pytest.raises(KeyError):
        wire["other"]
