"""Delta sketches (protocol.artifact.sketch) and the validator's sketch history (validator.history)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from protocol.artifact.delta import DeltaRejected
from protocol.artifact.sketch import (
    SECRET_BYTES,
    cosines,
    load_or_create_secret,
    load_sketches,
    save_sketches,
    sketch,
)
from protocol.round.state import RoundStore
from validator.history import load_history, save_round


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
