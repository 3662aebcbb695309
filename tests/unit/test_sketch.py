"""Delta sketches (protocol.artifact.sketch), function fingerprints (protocol.artifact.fingerprint)
and the validator's sketch history (validator.history)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from protocol.artifact.delta import DeltaRejected
from protocol.artifact.fingerprint import equivalent_delta, expert_forward, fingerprint
from protocol.artifact.sketch import (
    SECRET_BYTES,
    cosines,
    load_or_create_secret,
    load_sketches,
    save_sketches,
    sketch,
)
from protocol.round.scoring import Entry, find_duplicates
from protocol.round.state import RoundStore
from validator.history import load_fingerprints, load_history, save_round


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _delta(x: torch.Tensor) -> dict[str, torch.Tensor]:
    half = x.numel() // 2
    return {"a.weight": x[:half].reshape(-1, 4), "b.weight": x[half:].reshape(-1, 4)}


def test_small_deltas_have_exact_cosines():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    y = 0.6 * x + y
    got = cosines({"x": sketch(_delta(x), secret=b"k"), "y": sketch(_delta(y), secret=b"k")})
    assert got[("x", "y")] == pytest.approx(_cos(x, y), abs=1e-6)


def test_large_deltas_estimate_the_cosine_within_a_few_standard_errors():
    dim = 1 << 12
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1 << 18, generator=g)
    for mix in (0.0, 0.5, 3.0):
        y = mix * x + torch.randn(1 << 18, generator=g)
        est = cosines(
            {
                "x": sketch(_delta(x), secret=b"s", dim=dim),
                "y": sketch(_delta(y), secret=b"s", dim=dim),
            }
        )[("x", "y")]
        assert abs(est - _cos(x, y)) < 5 / math.sqrt(dim), (mix, est, _cos(x, y))


def test_zero_delta_and_incomparable_pairs():
    x = torch.randn(64)
    sk = {
        "x": sketch(_delta(x), secret=b"s"),
        "zero": sketch(_delta(torch.zeros(64)), secret=b"s"),
        "other_secret": sketch(_delta(x), secret=b"t"),
        "other_shape": sketch({"a.weight": x}, secret=b"s"),
    }
    got = cosines(sk)
    assert got == {("x", "zero"): 0.0}


def test_a_known_secret_can_be_gamed_and_an_unknown_one_cannot():
    """Why validators keep the secret: a copycat who knows the signs hides a near-copy."""
    dim, n = 1 << 10, 1 << 18
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, generator=g)
    from protocol.artifact.sketch import _signs

    # The attacker's perturbation: the public signs of one bucket's elements, in key order.
    d = _delta(x)
    z = torch.zeros(n)
    half = n // 2
    signs = torch.cat([_signs(b"public", "a.weight", half), _signs(b"public", "b.weight", half)])
    bucket = torch.arange(n) % dim == 0
    z[bucket] = signs[bucket]
    z *= 0.1 * x.norm() / z.norm()
    copy = _delta(x + z)
    true = _cos(x, x + z)
    assert true > 0.99
    public = cosines(
        {"x": sketch(d, secret=b"public", dim=dim), "c": sketch(copy, secret=b"public", dim=dim)}
    )
    secret = cosines(
        {"x": sketch(d, secret=b"private", dim=dim), "c": sketch(copy, secret=b"private", dim=dim)}
    )
    assert public[("c", "x")] < 0.9  # gamed: below any sensible copy threshold
    assert abs(secret[("c", "x")] - true) < 0.02


def test_sketch_files_round_trip_and_reject_garbage(tmp_path):
    sk = {
        "alice": sketch(_delta(torch.randn(64)), secret=b"s"),
        "bob": sketch(_delta(torch.randn(64)), secret=b"s"),
    }
    save_sketches(tmp_path / "s.safetensors", sk)
    back = load_sketches(tmp_path / "s.safetensors")
    assert list(back) == ["alice", "bob"]
    for h in sk:
        assert back[h].signature == sk[h].signature and back[h].key_id == sk[h].key_id
        assert torch.equal(back[h].vector, sk[h].vector)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="not a sketch file"):
        load_sketches(tmp_path / "bad.safetensors")


def test_secret_is_drawn_once_and_kept_private(tmp_path):
    path = tmp_path / "v" / "sketch.secret"
    first = load_or_create_secret(path)
    assert len(first) == SECRET_BYTES and load_or_create_secret(path) == first
    assert os.stat(path).st_mode & 0o077 == 0
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a 32-byte sketch secret"):
        load_or_create_secret(path)


# ----------------------------------------------------------------------------- history


def _fetched(rounds: RoundStore, q: int, hotkeys: list[str]) -> None:
    fetched = {
        h: {
            "path": f"artifacts/{q}/{h}",
            "artifact_sha256": f"{i:064x}",
            "block": 10 * q + i,
            "tiebreak": "t",
        }
        for i, h in enumerate(hotkeys)
    }
    rounds.save(q, {**rounds.load(q), "fetch": {"fetched": fetched}})


def test_history_uses_stored_sketches_and_falls_back_to_artifacts(tmp_path):
    rounds = RoundStore(tmp_path)
    deltas = {h: _delta(torch.randn(64)) for h in ("alice", "bob", "carol")}
    reads = []

    def read(path, sha):
        reads.append(path.name)
        if path.name == "carol":
            raise DeltaRejected("nonfinite", "NaN")
        return deltas[path.name]

    for q in (0, 1):
        _fetched(rounds, q, ["alice", "bob", "carol"])
        for h in deltas:
            (tmp_path / "artifacts" / str(q)).mkdir(parents=True, exist_ok=True)
            (tmp_path / "artifacts" / str(q) / h).write_bytes(b"x")
    # Round 1 was scored with sketches (carol rejected then); round 0 predates them.
    save_round(tmp_path, 1, {h: sketch(deltas[h], secret=b"s") for h in ("alice", "bob")})
    got = load_history(tmp_path, rounds, 2, 8, b"s", read)
    assert sorted(got) == ["round 0: alice", "round 0: bob", "round 1: alice", "round 1: bob"]
    assert reads == ["alice", "bob", "carol"]  # only round 0 read from disk
    entry, sk = got["round 1: bob"]
    assert (entry.hotkey, entry.commit_block) == ("round 1: bob", 11)
    assert torch.equal(sk.vector, sketch(deltas["bob"], secret=b"s").vector)
    # Another secret: round 1's file is unusable, both rounds come from the artifacts.
    reads.clear()
    got = load_history(tmp_path, rounds, 2, 8, b"other", read)
    assert len(got) == 4 and reads == ["alice", "bob", "carol"] * 2
    # The window: round 2 with window 1 sees round 1 only.
    assert sorted(load_history(tmp_path, rounds, 2, 1, b"s", read)) == [
        "round 1: alice",
        "round 1: bob",
    ]


# ----------------------------------------------------------------------------- function fingerprints

H, INNER = 16, 8  # a small expert: hidden size, intermediate size
PROJS = ("gate_proj", "up_proj", "down_proj")


def _key(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def _experts(seed: int, scale: float, experts=((0, 1), (1, 3))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj": (INNER, H), "up_proj": (INNER, H), "down_proj": (H, INNER)}
    return {
        _key(layer, e, p): scale * torch.randn(shapes[p], generator=g)
        for layer, e in experts
        for p in PROJS
    }


BASE = _experts(0, 0.3)
ORIGINAL = _experts(1, 0.05)


def _fn_cos(a: dict, b: dict, secret: bytes = b"s") -> float:
    fa, fb = fingerprint(a, BASE, secret=secret), fingerprint(b, BASE, secret=secret)
    return cosines({"a": fa, "b": fb})[("a", "b")]


def _raw_cos(a: dict, b: dict) -> float:
    return cosines({"a": sketch(a, secret=b"s"), "b": sketch(b, secret=b"s")})[("a", "b")]


@pytest.mark.parametrize(
    "transform",
    [
        dict(flip=False, rescale=False),
        dict(permute=False, rescale=False),
        dict(permute=False, flip=False),
        dict(),
    ],
    ids=["permuted", "sign_flipped", "rescaled", "permuted_flipped_rescaled"],
)
def test_function_preserving_copy_has_the_same_fingerprint(transform):
    """The attack: the original's experts relabelled so the raw delta looks new; the function,
    and so the fingerprint, is unchanged while the raw cosine falls below any copy threshold."""
    copy = equivalent_delta(ORIGINAL, BASE, torch.Generator().manual_seed(3), **transform)
    x = torch.randn(5, H)
    for layer, e in ((0, 1), (1, 3)):
        w = [BASE[_key(layer, e, p)] + ORIGINAL[_key(layer, e, p)] for p in PROJS]
        w_copy = [BASE[_key(layer, e, p)] + copy[_key(layer, e, p)] for p in PROJS]
        assert torch.allclose(expert_forward(*w, x), expert_forward(*w_copy, x), atol=1e-5)
    assert _raw_cos(ORIGINAL, copy) < 0.95  # the raw sketch misses it ...
    assert _fn_cos(ORIGINAL, copy) > 0.9999  # ... the fingerprint does not


def test_independent_deltas_have_dissimilar_fingerprints():
    assert abs(_fn_cos(ORIGINAL, _experts(2, 0.05))) < 0.5
    assert _fn_cos(ORIGINAL, {k: 1.1 * v for k, v in ORIGINAL.items()}) > 0.99  # scaled copy


def test_fingerprints_need_the_same_secret_and_are_never_compared_with_sketches():
    prints = {
        "s": fingerprint(ORIGINAL, BASE, secret=b"s"),
        "t": fingerprint(ORIGINAL, BASE, secret=b"t"),
        "raw": sketch(ORIGINAL, secret=b"s"),
    }
    assert cosines(prints) == {}
    assert not torch.equal(prints["s"].vector, fingerprint(ORIGINAL, BASE, secret=b"t").vector)


def test_fingerprint_refuses_what_is_not_a_whole_expert():
    with pytest.raises(ValueError, match="not an expert projection key"):
        fingerprint({"a.weight": torch.zeros(2, 2)}, BASE, secret=b"s")
    partial = {k: v for k, v in ORIGINAL.items() if "down_proj" not in k}
    with pytest.raises(ValueError, match="needs all three"):
        fingerprint(partial, BASE, secret=b"s")
    with pytest.raises(ValueError, match="empty"):
        fingerprint({}, BASE, secret=b"s")


def test_an_overflowing_delta_has_a_zero_fingerprint_not_a_crash():
    """Outputs past float32's range have no direction (cosine 0 with everything), so the
    validator's duplicate rule never meets a NaN or an infinity."""
    huge = {k: torch.full_like(v, 1e3) for k, v in ORIGINAL.items()}
    huge_base = {k: torch.full_like(v, 1e15) for k, v in BASE.items()}
    fp = fingerprint(huge, huge_base, secret=b"s", n=4)
    assert not fp.vector.any()
    assert cosines({"huge": fp, "x": fingerprint(ORIGINAL, huge_base, secret=b"s", n=4)}) == {
        ("huge", "x"): 0.0
    }


def test_function_rule_makes_the_later_commitment_the_duplicate():
    entries = [Entry("orig", "01", 5), Entry("copier", "02", 7), Entry("other", "03", 6)]
    raw = {("copier", "orig"): 0.04, ("orig", "other"): 0.3, ("copier", "other"): 0.01}
    fn = {("copier", "orig"): 0.9999, ("orig", "other"): 0.6, ("copier", "other"): 0.6}
    assert find_duplicates(entries, raw) == {}  # the raw rule alone misses the copier
    dups = find_duplicates(entries, raw, function_similarity=fn, function_threshold=0.9)
    assert set(dups) == {"copier"}
    d = dups["copier"]
    assert (d.original, d.kind, d.similarity) == ("orig", "function", 0.9999)
    assert "function similarity 0.9999 on the validator's secret probes" in d.reason
    with pytest.raises(ValueError, match="function_threshold"):
        find_duplicates(entries, raw, function_similarity=fn, function_threshold=0)


def test_history_keeps_fingerprints_of_fetched_deltas(tmp_path):
    rounds = RoundStore(tmp_path)
    _fetched(rounds, 0, ["alice", "bob"])
    fp = {
        h: fingerprint(_experts(i, 0.05), BASE, secret=b"s") for i, h in enumerate(["alice", "bob"])
    }
    save_round(tmp_path, 0, {h: sketch(ORIGINAL, secret=b"s") for h in fp}, fp)
    got = load_fingerprints(tmp_path, rounds, 1, 8, b"s")
    assert sorted(got) == ["round 0: alice", "round 0: bob"]
    assert torch.equal(got["round 0: bob"].vector, fp["bob"].vector)
    assert load_fingerprints(tmp_path, rounds, 1, 8, b"other") == {}  # another secret: unusable
    assert load_fingerprints(tmp_path, rounds, 2, 1, b"s") == {}  # outside the window
