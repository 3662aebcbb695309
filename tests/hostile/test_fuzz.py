"""Fuzzing the untrusted delta reader: whatever the bytes, only DeltaRejected comes out.

Inputs are built on top of the fixed corpus: random byte mutations of the valid delta and of
every hostile class (biased towards the length prefix and the header, where the parser lives),
random JSON headers with random entries and metadata over a random data section, random JSON
values put in place of single header fields, and plain random bytes. The reader either returns
a delta that satisfies every promise it makes (the assigned keys, right shapes, finite values
under the cap, the expected round) or raises DeltaRejected with a known code; any other
exception fails. Example counts are modest so the module stays a few seconds on 2 cores; the
example database is off, so a run never depends on what an earlier run on the machine found.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.artifact.delta import DEFAULT_MAX_ABS, DeltaRejected
from protocol.artifact.untrusted import read_delta_untrusted

from .conftest import ROUND, SHARD
from .corpus import (
    CLASSES,
    PICKLE_SENTINEL,
    SOURCE_ENCODINGS,
    Valid,
    encoded,
    make_valid,
    pack,
    split,
)

CODES = {
    "truncated", "header_size", "header_json", "duplicate_key", "metadata", "assignment_hash",
    "base_hash", "round", "unexpected_key", "missing_key", "dtype", "shape", "offsets",
    "nonfinite", "magnitude", "too_large", "safetensors", "scale", "rank", "zero", "wrong_shard",
}  # fmt: skip
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, random_moe_dir, random_assignment):
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.model import expert_layout, load_model

    root = tmp_path_factory.mktemp("fuzz")
    valid = make_valid(
        random_moe_dir, random_assignment, root / "valid.safetensors", round=ROUND, shard=SHARD
    )
    layout = expert_layout(load_model(random_moe_dir))
    kwargs = dict(
        layout=layout,
        assignment=random_assignment,
        max_bytes=valid.cap,
        expected_base_hash=sha256_dir(random_moe_dir),
        expected_round=ROUND,
        expected_shard=SHARD,
    )
    seeds = [valid.data] + [c.build(valid) for c in CLASSES]
    sources = [encoded(valid, e).data for e in SOURCE_ENCODINGS]  # int8, low-rank: valid too
    return dict(
        path=root / "fuzzed.safetensors", valid=valid, kwargs=kwargs, seeds=seeds, sources=sources
    )


def check(ctx, data: bytes) -> str:
    """Read `data` untrusted; 'ok' or the rejection code. Anything else propagates (a fail)."""
    ctx["path"].write_bytes(data)
    try:
        meta, tensors = read_delta_untrusted(ctx["path"], **ctx["kwargs"])
    except DeltaRejected as e:
        assert e.code in CODES, e.code
        assert isinstance(e.message, str) and e.message
        return e.code
    # Accepted: everything the validator relies on afterwards must hold.
    valid: Valid = ctx["valid"]
    layout = ctx["kwargs"]["layout"]
    assert meta.round == ROUND and meta.shard == SHARD
    assert list(tensors) == list(valid.keys)
    for key, t in tensors.items():
        assert tuple(t.shape) == layout.proj_shape(key.rsplit(".", 2)[1])
        assert bool(t.isfinite().all()) and float(t.abs().max()) <= DEFAULT_MAX_ABS
    assert not PICKLE_SENTINEL.exists()
    return "ok"


def test_seeds_are_what_the_corpus_says(ctx):
    """The fuzzer's starting points: the valid file passes, every class is refused."""
    assert check(ctx, ctx["seeds"][0]) == "ok"
    codes = [check(ctx, s) for s in ctx["seeds"][1:]]
    # sha256_mismatch is a valid file without its commitment: accepted when none is expected.
    assert codes == [c.code if c.name != "sha256_mismatch" else "ok" for c in CLASSES]


# ---------------------------------------------------------------------------- byte mutations


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    # The valid file half the time: edits to it reach the late checks (values, offsets).
    data = bytearray(draw(st.sampled_from(seeds[:1]) | st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        n = len(data)
        # Half the edits land in the first 2 KiB: the length prefix and the JSON header.
        hot = min(n, 2048)
        pos = draw(st.integers(0, max(0, (hot if draw(st.booleans()) else n) - 1)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        if op == "flip" and n:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[pos] = draw(st.sampled_from([0, 0x22, 0x2C, 0x30, 0x5B, 0x7B, 0x7D, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def test_random_byte_mutations(ctx):
    @settings(FUZZ, max_examples=300)
    @given(mutated(ctx["seeds"]))
    def run(data):
        check(ctx, data)

    run()


def test_random_byte_mutations_of_compressed_encodings(ctx):
    """The same mutations on the valid delta re-encoded as int8 and low rank: scales, factors
    and the decoder behind them see flipped bits too."""
    assert [check(ctx, data) for data in ctx["sources"]] == ["ok"] * len(SOURCE_ENCODINGS)

    @settings(FUZZ, max_examples=200)
    @given(mutated(ctx["sources"]))
    def run(data):
        check(ctx, data)

    run()


def test_random_bytes(ctx):
    @settings(FUZZ, max_examples=100)
    @given(st.binary(max_size=4096))
    def run(data):
        check(ctx, data)

    run()


# ---------------------------------------------------------------------------- random headers

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
DTYPES = st.sampled_from(["F32", "BF16", "F16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "x"])


@st.composite
def random_header(draw, valid: Valid) -> bytes:
    """A header written from scratch. Each part is often right and otherwise random, so
    examples get past the early checks and reach the later ones."""
    real, _ = split(valid.data)
    extras = ["model.embed_tokens.weight", "model.layers.0.mlp.gate.weight"]
    if draw(st.booleans()):
        extra = st.lists(st.sampled_from(extras) | st.text(max_size=20), max_size=1)
        names = list(valid.keys) + (draw(extra) if draw(st.booleans()) else [])
        names = list(dict.fromkeys(draw(st.permutations(names))))
        if draw(st.integers(0, 3)) == 0:
            names.pop(draw(st.integers(0, len(names) - 1)))
    else:
        pool = st.sampled_from(list(valid.keys) + extras) | st.text(max_size=20)
        names = draw(st.lists(pool, max_size=8, unique=True))
    header: dict = {}
    how = draw(st.sampled_from(["intact", "intact", "modified", "absent"]))
    if how != "absent":
        fields = json.loads(real["__metadata__"]["moesaic"])
        if how == "modified":
            for name in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, unique=True)):
                fields[name] = draw(JSON)
        header["__metadata__"] = {"moesaic": json.dumps(fields)}
    # Per header, how often (in tenths) an entry's field is wrong: never, rarely or often.
    wrong = draw(st.sampled_from([0, 1, 5]))

    def bad() -> bool:
        return draw(st.integers(0, 9)) < wrong

    cursor = 0
    for name in names:
        right = real.get(name, {"shape": [4, 4]})["shape"]
        shape = draw(st.lists(st.integers(-2, 64), max_size=3)) if bad() else right
        dtype = draw(DTYPES) if bad() else "F32"
        count = 1
        for d in right:
            count *= d
        size = draw(st.integers(0, 4096)) if bad() else 4 * count
        begin = draw(st.sampled_from([cursor + 4, cursor - 4, 0])) if bad() else cursor
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
        cursor = begin + size
    # Data bytes that read as 0.0, a huge finite float, NaN, or small values.
    filler = draw(st.sampled_from([b"\0", b"\x7f", b"\xff", b"\x3c"]))
    body = filler * max(0, cursor + draw(st.sampled_from([0, 0, -8, 8])))
    return pack(header, body)


def test_random_headers(ctx):
    @settings(FUZZ, max_examples=150)
    @given(random_header(ctx["valid"]))
    def run(data):
        check(ctx, data)

    run()


@st.composite
def field_replaced(draw, valid: Valid) -> bytes:
    """The valid file with one header value (anywhere, nested included) replaced at random."""
    header, body = split(valid.data)
    key = draw(st.sampled_from(sorted(header)))
    entry = header[key]
    field = draw(st.sampled_from(sorted(entry)))
    if key == "__metadata__" and draw(st.booleans()):
        fields = json.loads(entry[field])
        fields[draw(st.sampled_from(sorted(fields)))] = draw(JSON)
        entry[field] = json.dumps(fields)
    elif draw(st.booleans()):
        entry[field] = draw(JSON)
    else:
        header[key] = draw(JSON)
    return pack(json.dumps(header), body)


def test_random_field_values(ctx):
    @settings(FUZZ, max_examples=150)
    @given(field_replaced(ctx["valid"]))
    def run(data):
        check(ctx, data)

    run()
