"""miner/feedback.py: the residual maths on small tensors, and its files across rounds."""

from __future__ import annotations

import logging

import pytest
import torch

from miner.feedback import (
    ResidualStore,
    corrected,
    drop_unsent,
    fits,
    previous_residual,
    residual_of,
    write_with_feedback,
)
from protocol.artifact.delta import DeltaMeta, wire_roundtrip

KEYS = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in (1, 4)]
HASH_A, HASH_B = "a" * 64, "b" * 64


def delta(seed: int, shape=(12, 20)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) * 1e-2 for k in KEYS}


def meta(rnd: int, encoding="lowrank2-int8", assignment=HASH_A) -> DeltaMeta:
    return DeltaMeta(
        base_hash="1" * 64,
        assignment_hash=assignment,
        round=rnd,
        tokens=1,
        shard="5" * 64,
        encoding=encoding,
    )


def read_sent(path) -> dict[str, torch.Tensor]:
    """What a receiver decodes (trusted read of our own test file, then the shared decoder)."""
    from safetensors.torch import load_file

    from protocol.artifact.delta import decode_delta

    return decode_delta(load_file(str(path)), "lowrank2-int8", KEYS)


def norm(d) -> float:
    return sum(float(t.norm()) ** 2 for t in d.values()) ** 0.5


# --- the pure core ---------------------------------------------------------------------------


def test_nothing_is_lost_only_delayed():
    """Over rounds, sum(sent) + residual == sum(delta): the error-feedback invariant."""
    residual: dict = {}
    total_delta = {k: torch.zeros(12, 20) for k in KEYS}
    total_sent = {k: torch.zeros(12, 20) for k in KEYS}
    plain_sent = {k: torch.zeros(12, 20) for k in KEYS}
    for r in range(6):
        d = delta(r)
        x = corrected(d, residual)
        sent = wire_roundtrip(x, "lowrank2")
        residual = residual_of(x, sent)
        plain = wire_roundtrip(d, "lowrank2")
        for k in KEYS:
            total_delta[k] += d[k]
            total_sent[k] += sent[k]
            plain_sent[k] += plain[k]
    for k in KEYS:
        torch.testing.assert_close(total_sent[k] + residual[k], total_delta[k], atol=1e-6, rtol=0)
    # With feedback the shipped sum tracks the trained sum better than without.
    err_fb = norm({k: total_sent[k] - total_delta[k] for k in KEYS})
    err_plain = norm({k: plain_sent[k] - total_delta[k] for k in KEYS})
    assert err_fb < err_plain


def test_corrected_and_residual_are_elementwise():
    d = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0]], dtype=torch.bfloat16)}
    r = {"a": torch.tensor([[0.5, -1.0]])}
    x = corrected(d, r)
    assert torch.equal(x["a"], torch.tensor([[1.5, 1.0]])) and x["b"].dtype == torch.float32
    x["b"] += 1  # a copy: the caller's delta is not modified
    assert float(d["b"]) == 3.0
    left = residual_of(x, {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[4.0]])})
    assert torch.equal(left["a"], torch.tensor([[0.5, 0.0]])) and float(left["b"]) == 0.0
    assert fits(r, d) is not None and fits(d, d) is None
    assert "shape" in fits({"a": torch.ones(2, 1), "b": torch.ones(1, 1)}, d)


# --- the files ---------------------------------------------------------------------------------


def test_store_finds_the_latest_earlier_round_and_prunes(tmp_path):
    store = ResidualStore(tmp_path)
    for r in (0, 2, 5):
        store.save(r, delta(r), assignment_hash=HASH_A, encoding="int8")
    (tmp_path / "01.residual.safetensors").write_bytes(b"not ours")  # not a round name
    (tmp_path / "3.delta.safetensors").write_bytes(b"")
    assert store.rounds() == [0, 2, 5]
    assert [store.previous(r) for r in (0, 1, 2, 3, 5, 9)] == [None, 0, 0, 2, 2, 5]
    got_meta, got = store.load(2)
    assert got_meta == {"round": 2, "assignment_hash": HASH_A, "encoding": "int8"}
    assert all(torch.equal(got[k], delta(2)[k]) for k in KEYS)
    store.prune(2)
    assert store.rounds() == [2, 5]


def test_residuals_of_rounds_never_sent_are_dropped_back_to_the_last_sent(tmp_path, caplog):
    store = ResidualStore(tmp_path)
    for r in (0, 2, 3, 4, 6):
        store.save(r, delta(r), assignment_hash=HASH_A, encoding="int8")
    sent = {0, 2, 6}  # rounds 3 and 4 trained but never committed; 6 is after the round asked
    asked = []

    def never_sent(q):
        asked.append(q)
        return q not in sent

    with caplog.at_level(logging.WARNING, logger="moesaic.miner"):
        assert drop_unsent(store, 5, never_sent) == [4, 3]
    assert asked == [4, 3, 2]  # newest first, stopping at the first round that was sent
    assert store.rounds() == [0, 2, 6] and store.previous(5) == 2
    assert "residual of round 4 dropped" in caplog.text and "never committed" in caplog.text
    assert drop_unsent(store, 5, never_sent) == []  # nothing more: round 2 was sent
    assert drop_unsent(ResidualStore(tmp_path / "none"), 5, never_sent) == []


def test_previous_residual_drops_what_does_not_apply(tmp_path, caplog):
    store = ResidualStore(tmp_path)
    store.save(0, delta(0), assignment_hash=HASH_A, encoding="int8")
    assert previous_residual(store, 1, HASH_A, delta(1))[0] == 0
    with caplog.at_level(logging.WARNING, logger="moesaic.miner"):
        assert previous_residual(store, 1, HASH_B, delta(1)) == (0, {})
        assert "assignment" in caplog.text
        other_keys = {"x": torch.zeros(12, 20)}
        assert previous_residual(store, 1, HASH_A, other_keys) == (0, {})
        store.path(0).write_bytes(b"garbage")
        assert previous_residual(store, 1, HASH_A, delta(1)) == (0, {})
        assert "unreadable" in caplog.text


def test_write_with_feedback_across_rounds(tmp_path, caplog):
    store = ResidualStore(tmp_path / "state")
    out = tmp_path / "d.safetensors"

    # Round 0: nothing earlier; what was dropped is kept for round 0.
    sha0 = write_with_feedback(store.dir, out, delta(0), meta(0))
    sent0 = read_sent(out)
    _, res0 = store.load(0)
    for k in KEYS:
        torch.testing.assert_close(sent0[k] + res0[k], delta(0)[k], atol=1e-7, rtol=0)
    assert sha0 == write_with_feedback(tmp_path / "fresh", out, delta(0), meta(0))

    # Round 1 ships delta 1 plus round 0's residual.
    sha1 = write_with_feedback(store.dir, out, delta(1), meta(1))
    sent1 = read_sent(out)
    _, res1 = store.load(1)
    want = corrected(delta(1), res0)
    for k in KEYS:
        torch.testing.assert_close(sent1[k], wire_roundtrip(want, "lowrank2-int8")[k])
        torch.testing.assert_close(sent1[k] + res1[k], want[k], atol=1e-7, rtol=0)
    assert store.rounds() == [0, 1]

    # Round 1 again (a crash before it was recorded): round 0's residual, the same bytes.
    assert write_with_feedback(store.dir, out, delta(1), meta(1)) == sha1
    assert store.rounds() == [0, 1]

    # Round 2 under another assignment: round 1's residual is dropped, with a log line.
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        sha2 = write_with_feedback(store.dir, out, delta(2), meta(2, assignment=HASH_B))
    assert "dropped" in caplog.text and "no residual added" in caplog.text
    assert sha2 == write_with_feedback(
        tmp_path / "fresh2", out, delta(2), meta(2, assignment=HASH_B)
    )
    assert store.rounds() == [1, 2]  # round 1's kept: a re-run of round 2 must see it again


@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "float16"])
def test_lossless_encodings_keep_no_residual(tmp_path, encoding):
    from protocol.artifact.delta import write_delta

    state = tmp_path / "state"
    ResidualStore(state).save(0, delta(0), assignment_hash=HASH_A, encoding="int8")
    out = tmp_path / "d.safetensors"
    sha = write_with_feedback(state, out, delta(1), meta(1, encoding=encoding))
    assert sha == write_delta(tmp_path / "plain.safetensors", delta(1), meta(1, encoding=encoding))
    assert ResidualStore(state).rounds() == [0]  # not read, not written


# --- choosing an encoding ------------------------------------------------------------------------


def test_miner_settings_accept_every_encoding_and_list_them_when_wrong(capsys):
    from miner.node import TrainSettings
    from moesaic.cli import main

    for name in ("float32", "bfloat16", "float16", "int8", "lowrank8", "lowrank8-int8"):
        assert TrainSettings(encoding=name).encoding == name
    for bad in ("int4", "lowrank0", "lowrank08", "lowrank8-int4"):
        with pytest.raises(ValueError, match="train.encoding") as info:
            TrainSettings(encoding=bad)
        for listed in ("bfloat16", "int8", "lowrank<R>", "lowrank<R>-int8", "lowrank8"):
            assert listed in str(info.value)
    with pytest.raises(SystemExit):
        main(["miner", "train", "--model", "m", "--assignment", "a", "--data", "d",
              "--out", "o", "--encoding", "lowrank08"])  # fmt: skip
    assert "lowrank<R>-int8" in capsys.readouterr().err
