"""Delta wire encodings (protocol.artifact.encodings, protocol.artifact.delta): names, round trips, error bounds,
byte accounting, and the dense encodings' bytes unchanged by the compressed ones' arrival."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from protocol.artifact.delta import (
    ENCODINGS,
    DeltaMeta,
    decode_delta,
    encode_delta,
    expert_keys,
    max_delta_bytes,
    parse_expert_key,
    wire_layout,
    wire_roundtrip,
    write_delta,
)
from protocol.artifact.encodings import (
    MAX_RANK,
    is_encoding,
    parse_encoding,
    payload_bytes,
    widest_payload_bytes,
    wire_entries,
)
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.identity.hashing import canonical_json
from protocol.moe.experts import Assignment
from protocol.moe.model import ExpertLayout

KEY = "model.layers.0.mlp.experts.3.gate_proj.weight"
ALL = ["float32", "bfloat16", "float16", "int8", "lowrank2", "lowrank2-int8", "lowrank10"]


def small_world(hidden=8, inter=4):
    """A hand-made layout (2 MoE layers, 4 experts) and a 3-expert assignment over it."""
    layout = ExpertLayout("model.layers", (0, 1), 4, hidden, inter, 2)
    a = Assignment(
        layers={0: (1,), 1: (0, 3)},
        method="token-ratio",
        p=0.2,
        model_hash="0" * 64,
        num_experts=4,
    )
    return layout, a


def fixed_delta(layout, a) -> dict[str, torch.Tensor]:
    """Values from arithmetic only (no RNG): the same on every machine and torch version."""
    out = {}
    for i, k in enumerate(expert_keys(layout, a)):
        m, n = layout.proj_shape(parse_expert_key(k)[3])
        x = (torch.arange(m * n, dtype=torch.float64) * 0.37 + i) % 1 - 0.5
        out[k] = x.float().reshape(m, n) * 0.01
    return out


def meta_for(a, encoding: str) -> DeltaMeta:
    return DeltaMeta(
        base_hash="1" * 64,
        assignment_hash=a.hash(),
        round=7,
        tokens=123,
        shard="3" * 64,
        encoding=encoding,
    )


def read(path, layout, a):
    return read_delta_untrusted(
        path, layout=layout, assignment=a, max_bytes=max_delta_bytes(layout, a)
    )


# --- names -----------------------------------------------------------------------------------


def test_encoding_names():
    assert parse_encoding("lowrank8").rank == 8 and not parse_encoding("lowrank8").int8
    assert parse_encoding("lowrank8-int8").int8 and parse_encoding("int8").kind == "int8"
    assert parse_encoding(f"lowrank{MAX_RANK}").rank == MAX_RANK
    assert [parse_encoding(n).lossless for n in ("float32", "bfloat16", "float16")] == [True] * 3
    assert not any(parse_encoding(n).lossless for n in ("int8", "lowrank1", "lowrank1-int8"))
    assert parse_encoding("lowrank64").rank_for((16, 32)) == 16
    assert parse_encoding("lowrank8").rank_for((768, 2048)) == 8
    bad = ["lowrank0", "lowrank-3", "lowrank08", "lowrankX", "lowrank", "lowrank 8", "lowrank8 ",
           "LOWRANK8", "lowrank8-int4", "lowrank8-bf16", f"lowrank{MAX_RANK + 1}", "int4", "fp32",
           "lowrank" + "9" * 4400, "", None, 8, b"int8"]  # fmt: skip
    for name in bad:
        assert not is_encoding(name), name
        with pytest.raises(ValueError, match="lowrank<R>-int8"):
            parse_encoding(name)
        if isinstance(name, str):
            with pytest.raises(ValueError):
                DeltaMeta(base_hash="1" * 64, assignment_hash="2" * 64, round=0, tokens=0,
                          shard="3" * 64, encoding=name)  # fmt: skip


def test_wire_entries_name_every_part():
    m, n = 768, 2048
    assert wire_entries("bfloat16", KEY, (m, n)) == [(KEY, "BF16", [m, n])]
    assert wire_entries("int8", KEY, (m, n)) == [(KEY, "I8", [m, n]), (KEY + ".scale", "F32", [m])]
    assert wire_entries("lowrank8", KEY, (m, n)) == [
        (KEY + ".u", "BF16", [m, 8]),
        (KEY + ".v", "BF16", [8, n]),
    ]
    assert wire_entries("lowrank8-int8", KEY, (m, n)) == [
        (KEY + ".u", "I8", [m, 8]),
        (KEY + ".u.scale", "F32", [8]),
        (KEY + ".v", "I8", [8, n]),
        (KEY + ".v.scale", "F32", [8]),
    ]


# --- the dense encodings did not change ------------------------------------------------------

# sha256 of fixed_delta(small_world()) written by write_delta before int8 and lowrank existed.
DENSE_SHA256 = {
    "float32": "b37f5fc3b2390108084caa6f28722eff5b8215a38cb62d263550672e0c813f35",
    "bfloat16": "97131afbe9464ff40e12206e472ef1b48f4e4f07d4d8c2dc8fd7a25440a11497",
    "float16": "05e34d3249b1780652c74e763f4e8980af019502545394228511aab49466a6e8",
}


@pytest.mark.parametrize("encoding", sorted(DENSE_SHA256))
def test_dense_encodings_are_byte_identical_to_before(tmp_path, encoding):
    from safetensors.torch import load, save

    layout, a = small_world()
    path = tmp_path / "d.safetensors"
    write_delta(path, fixed_delta(layout, a), meta_for(a, encoding))
    # Format 2 added the `shard` claim; with format 1's metadata put back, the bytes are the
    # old file's: the tensors and their layout did not change.
    fields = {**json.loads(meta_for(a, encoding).to_json()), "format_version": 1}
    del fields["shard"]
    legacy = save(load(path.read_bytes()), metadata={"moesaic": canonical_json(fields).decode()})
    assert hashlib.sha256(legacy).hexdigest() == DENSE_SHA256[encoding]
    # The metadata JSON is as canonical as ever: sorted keys, no whitespace.
    assert meta_for(a, encoding).to_json() == json.dumps(
        json.loads(meta_for(a, encoding).to_json()), sort_keys=True, separators=(",", ":")
    )


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ALL)
def test_round_trip_through_the_file_is_wire_roundtrip(tmp_path, encoding):
    """What the reader decodes from the file is bit for bit what wire_roundtrip predicts (the
    miner's error feedback relies on it), under the hub keys, close to the input: compressed
    encodings decode to float32, dense ones stay in their stored dtype."""
    layout, a = small_world(hidden=32, inter=16)
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in fixed_delta(layout, a).items()}
    path = tmp_path / "d.safetensors"
    sha = write_delta(path, delta, meta_for(a, encoding))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert write_delta(tmp_path / "again.safetensors", delta, meta_for(a, encoding)) == sha
    meta, got = read(path, layout, a)
    expected = wire_roundtrip(delta, encoding)
    assert meta.encoding == encoding and list(got) == expert_keys(layout, a)
    for key, t in got.items():
        want = ENCODINGS[encoding][1] if encoding in ENCODINGS else torch.float32
        assert t.dtype == want and torch.equal(t, expected[key])
    enc = parse_encoding(encoding)
    for key, x in delta.items():
        rel = float((got[key] - x).norm() / x.norm())
        if enc.kind == "lowrank" and enc.rank < min(x.shape):  # the best rank-R approximation
            s = torch.linalg.svdvals(x)
            best = float(s[enc.rank :].norm() / s.norm())
            assert best - 1e-6 <= rel <= best + 0.02, (key, rel, best)
        else:
            assert rel < {"float32": 1e-7, "int8": 0.02}.get(encoding, 0.01), (key, rel)


def test_int8_error_is_at_most_half_a_scale():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.03
    x[5] = 0.0  # an all-zero row: scale 0, decoded exactly
    x[7, 3] = 40.0  # one outlier: only its own row gets the coarse scale
    wire = encode_delta({KEY: x}, "int8")
    q, scale = wire[KEY], wire[KEY + ".scale"]
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert int(q.abs().max()) == 127 and float(scale[5]) == 0.0
    assert torch.equal(scale, x.abs().amax(dim=1) / 127)
    got = decode_delta(wire, "int8")[KEY]
    err = (got - x).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert float(err[5].max()) == 0.0
    assert float(err[6].max()) < float(scale[7]) / 100  # row 6 is not hurt by row 7's outlier


@pytest.mark.parametrize("encoding", ["lowrank8", "lowrank8-int8"])
@pytest.mark.parametrize("shape", [(24, 40), (300, 520)])  # exact SVD; randomized SVD
def test_lowrank_recovers_an_exact_rank_r_matrix(encoding, shape):
    g = torch.Generator().manual_seed(2)
    m, n = shape
    x = (torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)) * 1e-3
    wire = encode_delta({KEY: x}, encoding)
    u, v = wire[KEY + ".u"], wire[KEY + ".v"]
    assert u.shape == (m, 8) and v.shape == (8, n)
    assert u.dtype == v.dtype == (torch.int8 if encoding.endswith("int8") else torch.bfloat16)
    got = decode_delta(wire, encoding)[KEY]
    rel = float((got - x).norm() / x.norm())
    assert rel < (0.02 if encoding.endswith("int8") else 0.01), rel
    # Balanced factors: U's and V's row norms are on the same scale (sqrt(S) on each side).
    uf, vf = u.float(), v.float()
    if encoding.endswith("int8"):
        uf, vf = uf * wire[KEY + ".u.scale"][None, :], vf * wire[KEY + ".v.scale"][:, None]
    ratio = float(uf.norm(dim=0).max() / vf.norm(dim=1).max())
    assert 0.5 < ratio < 2, ratio


def test_factors_wider_than_the_dense_matrix_are_refused():
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    # r (m + n) <= m n: rank 10 of [16, 32] is 480 numbers of 512, rank 11 is 528.
    wire = encode_delta({KEY: x}, "lowrank10")
    assert wire[KEY + ".u"].shape == (16, 10) and wire[KEY + ".v"].shape == (10, 32)
    for name in ("lowrank11", "lowrank64", "lowrank11-int8"):
        with pytest.raises(ValueError, match="more than the dense matrix's 512"):
            encode_delta({KEY: x}, name)


def test_encode_refuses_what_it_cannot_encode():
    with pytest.raises(ValueError, match="empty"):
        encode_delta({}, "int8")
    with pytest.raises(ValueError, match="non-finite"):
        encode_delta({KEY: torch.tensor([[1.0, float("inf")]])}, "lowrank1")
    with pytest.raises(ValueError, match="2-D"):
        encode_delta({KEY: torch.ones(4)}, "int8")
    with pytest.raises(ValueError, match="floating"):
        encode_delta({KEY: torch.ones(2, 2, dtype=torch.int8)}, "int8")
    with pytest.raises(ValueError, match="unknown"):
        encode_delta({KEY: torch.ones(2, 2)}, "lowrank0")


# --- sizes --------------------------------------------------------------------------------------


def test_bytes_of_one_768_by_2048_projection():
    shape = (768, 2048)
    assert {e: payload_bytes(e, shape) for e in ALL[:4] + ["lowrank8", "lowrank8-int8"]} == {
        "float32": 4 * 768 * 2048,  # 6,291,456
        "bfloat16": 2 * 768 * 2048,  # 3,145,728
        "float16": 2 * 768 * 2048,
        "int8": 768 * 2048 + 4 * 768,  # 1,575,936
        "lowrank8": 2 * (768 * 8 + 8 * 2048),  # 45,056
        "lowrank8-int8": 768 * 8 + 8 * 2048 + 4 * (8 + 8),  # 22,592: one scale per component
    }
    # Full-rank bf16 factors (2 * 768 * 2816 bytes) stay under float32: it is the widest.
    assert payload_bytes("lowrank768", shape) == 2 * 768 * (768 + 2048) < 4 * 768 * 2048
    assert widest_payload_bytes(shape) == 4 * 768 * 2048


@pytest.mark.parametrize("encoding", ALL)
def test_file_size_is_what_the_formula_says(tmp_path, encoding):
    layout, a = small_world(hidden=32, inter=16)
    path = tmp_path / "d.safetensors"
    write_delta(path, fixed_delta(layout, a), meta_for(a, encoding))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    shapes = [layout.proj_shape(parse_expert_key(k)[3]) for k in expert_keys(layout, a)]
    assert len(data) - 8 - n == sum(payload_bytes(encoding, s) for s in shapes)
    header = json.loads(data[8 : 8 + n])
    assert sorted(k for k in header if k != "__metadata__") == sorted(
        wire_layout(layout, a, encoding)
    )
    assert len(data) <= max_delta_bytes(layout, a, encoding) <= max_delta_bytes(layout, a)


@pytest.mark.parametrize("dims", [(1, 1), (1, 3), (2, 3), (3, 5), (8, 4), (32, 16)])
def test_the_default_bound_covers_every_encoding(dims):
    """max_delta_bytes() (what validators and mergers allow) is at least every encoding's
    bound, low rank at full rank included, also for shapes so thin that int8's scales or
    int8 factors' scales cost more than float32 would."""
    hidden, inter = dims
    layout, a = small_world(hidden=hidden, inter=inter)
    default = max_delta_bytes(layout, a)
    full = min(hidden, inter)
    names = ["float32", "bfloat16", "float16", "int8", f"lowrank{full}", f"lowrank{full}-int8",
             f"lowrank{MAX_RANK}", f"lowrank{MAX_RANK}-int8", "lowrank1", "lowrank1-int8"]  # fmt: skip
    bounds = {name: max_delta_bytes(layout, a, name) for name in names}
    assert max(bounds.values()) <= default, bounds
    if min(dims) >= 4:  # then float32 is the widest: the default is the float32 data bound
        assert default - bounds["float32"] == 256 * 3 * len(expert_keys(layout, a))
