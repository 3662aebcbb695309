"""The validator engine's pure parts on tiny inputs: the eval seed and delta cosine similarity."""

import hashlib
import math

import pytest
import torch

from protocol.artifact.delta import DeltaRejected
from protocol.moe.evaluate import eval_seed
from protocol.round.scoring import DUPLICATE, INVALID, Duplicate, Entry, find_duplicates
from validator.evaluate import Outcome, similarities

HASH = "0x" + "ab" * 32

# ----------------------------------------------------------------------------- eval_seed


def test_seed_known_answer():
    digest = hashlib.sha256(f"moesaic-eval-seed-v1|{'ab' * 32}|7|2".encode()).digest()
    assert eval_seed(HASH, 7, 2) == int.from_bytes(digest[:8], "big") >> 1


def test_seed_is_63_bit_and_pure():
    seeds = [eval_seed(f"0x{i:064x}", r, t) for i in range(20) for r in (0, 1) for t in (0, 5)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert len(set(seeds)) == len(seeds)
    assert eval_seed(HASH, 3, 1) == eval_seed(HASH, 3, 1)
    torch.Generator().manual_seed(max(seeds))  # a valid torch seed


def test_seed_depends_on_every_input():
    s = eval_seed(HASH, 3, 1)
    assert s != eval_seed("0x" + "ab" * 31 + "ac", 3, 1)
    assert s != eval_seed(HASH, 4, 1)
    assert s != eval_seed(HASH, 3, 2)
    # Fields cannot bleed into each other: "1|23" is not "12|3".
    assert eval_seed(HASH, 1, 23) != eval_seed(HASH, 12, 3)


def test_seed_normalises_hash_spelling():
    assert eval_seed(HASH, 3, 1) == eval_seed(HASH.upper().replace("0X", "0x"), 3, 1)
    assert eval_seed(HASH, 3, 1) == eval_seed("ab" * 32, 3, 1)


@pytest.mark.parametrize(
    "block_hash, rnd, task",
    [("", 0, 0), ("0x", 0, 0), ("0xzz", 0, 0), (None, 0, 0), (HASH, -1, 0), (HASH, 0, -1)]
    + [(HASH, True, 0), (HASH, 1.0, 0), (HASH, 0, "1")],
)
def test_seed_rejects_bad_inputs(block_hash, rnd, task):
    with pytest.raises(ValueError):
        eval_seed(block_hash, rnd, task)


# ----------------------------------------------------------------------------- similarities


def _delta(*values, keys=("a.weight", "b.weight")):
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in zip(keys, values, strict=True)}


def test_similarity_basic_geometry():
    x = _delta([[1.0, 2.0]], [[3.0, -1.0]])
    sims = similarities(
        {
            "x": x,
            "scaled": {k: 2.5 * v for k, v in x.items()},
            "neg": {k: -v for k, v in x.items()},
            "orth": _delta([[2.0, -1.0]], [[0.0, 0.0]]),
        }
    )
    assert set(sims) == {
        ("neg", "orth"),
        ("neg", "scaled"),
        ("neg", "x"),
        ("orth", "scaled"),
        ("orth", "x"),
        ("scaled", "x"),
    }
    assert sims[("scaled", "x")] == pytest.approx(1.0, abs=1e-6)
    assert sims[("neg", "x")] == pytest.approx(-1.0, abs=1e-6)
    assert sims[("orth", "x")] == pytest.approx(0.0, abs=1e-6)
    assert all(-1.0 <= s <= 1.0 for s in sims.values())


def test_similarity_matches_flattened_cosine_across_keys():
    g = torch.Generator().manual_seed(0)
    a = {k: torch.randn(3, 4, generator=g) for k in ("k1", "k2")}
    b = {k: torch.randn(3, 4, generator=g) for k in ("k1", "k2")}
    fa = torch.cat([a["k1"].flatten(), a["k2"].flatten()]).double()
    fb = torch.cat([b["k1"].flatten(), b["k2"].flatten()]).double()
    want = float(fa @ fb / (fa.norm() * fb.norm()))
    assert similarities({"b": b, "a": a})[("a", "b")] == pytest.approx(want, abs=1e-6)


def test_similarity_pairs_key_order_not_dict_order():
    x = _delta([[1.0]], [[1.0]])
    y = {k: v.bfloat16() for k, v in x.items()}  # encodings differ; still compared in float32
    assert list(similarities({"zed": x, "amy": y})) == [("amy", "zed")]


def test_different_keys_or_empty_or_zero_deltas():
    x = _delta([[1.0]], [[2.0]])
    other_keys = _delta([[1.0]], [[2.0]], keys=("a.weight", "c.weight"))
    zero = _delta([[0.0]], [[0.0]])
    reshaped = {"a.weight": torch.ones(1, 2), "b.weight": torch.ones(1, 1)}
    sims = similarities(
        {"x": x, "other": other_keys, "zero": zero, "empty": {}, "reshaped": reshaped}
    )
    assert sims == {("x", "zero"): 0.0}  # a zero delta has no direction


def test_similarities_feed_find_duplicates():
    g = torch.Generator().manual_seed(1)
    orig = {"w": torch.randn(8, 8, generator=g)}
    honest = {"w": torch.randn(8, 8, generator=g)}
    copy = {"w": 1.01 * orig["w"] + 1e-4 * torch.randn(8, 8, generator=g)}
    sims = similarities({"orig": orig, "honest": honest, "copy": copy})
    entries = [Entry("orig", "1" * 64, 5), Entry("honest", "2" * 64, 6), Entry("copy", "3" * 64, 7)]
    dups = find_duplicates(entries, sims, threshold=0.95)
    assert list(dups) == ["copy"] and dups["copy"].original == "orig"
    assert math.isclose(dups["copy"].similarity, 1.0, abs_tol=1e-4)


# ----------------------------------------------------------------------------- Outcome


def test_outcome_constructors():
    r = Outcome.rejected("h", DeltaRejected("nonfinite", "k: 1 NaN/Inf values"))
    assert (r.value, r.code, r.rejection, r.duplicate) == (0.0, INVALID, "nonfinite", None)
    assert r.reason == "delta rejected (nonfinite): k: 1 NaN/Inf values"
    dup = Duplicate("h", "o", "o", "digest", None, 9, 3)
    c = Outcome.copied("h", dup)
    assert (c.value, c.code, c.duplicate, c.reason) == (0.0, DUPLICATE, dup, dup.reason)
