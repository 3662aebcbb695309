"""Compressed deltas end to end: a miner's error feedback across rounds, and a lowrank8 delta
written by a real Miner, committed, fetched and scored by a real Validator.

.venv/bin/python -m pytest -q tests/integration/test_compressed_deltas.py

The error-feedback test uses the `lazy` strategy (noise shaped like a real delta, seeded per
round): no training, yet the same write path (miner.local.write_job_delta) as an honest miner,
so what each round ships and keeps is checked exactly. The validator test trains for real.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_validator_node import CHAIN, SCHEDULE, TASK, _validator, signer

from miner.node import Miner, TrainSettings
from protocol.chain.fake import FakeChain, FakeLedger
from protocol.round.context import RoleContext
from protocol.round.scoring import OK
from protocol.storage.file import FileStore

LOSSY = "lowrank4-int8"
QUICK = TrainSettings(steps=1, batch_size=2, seq_len=32, max_tokens=4000, encoding=LOSSY)
HONEST = TrainSettings(steps=16, lr=1e-2, batch_size=4, seq_len=64, max_tokens=20_000)


def miner(work_dir, base, assignment, *, train=QUICK, strategy="lazy", ledger=None, name="m"):
    ledger = ledger or FakeLedger(SCHEDULE)
    key = signer(name)
    ctx = RoleContext(
        FakeChain(ledger, key.identity),
        FileStore(work_dir.parent / f"{work_dir.name}-store"),
        schedule=SCHEDULE,
        chain_label=CHAIN,
        task_id=TASK,
        base_dir=base,
        assignment_path=assignment,
        signer=key,
    )
    return Miner(
        ctx,
        data_spec="corpus:math",
        work_dir=work_dir,
        train=dataclasses.replace(train, device="cpu"),
        quiet=True,
        strategy=strategy,
    )


def read(base, assignment_path, path):
    """(meta, decoded float32 tensors) as a validator reads the file."""
    from protocol.artifact.delta import max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, load_model

    layout, a = expert_layout(load_model(base)), Assignment.load(assignment_path)
    return read_delta_untrusted(
        path, layout=layout, assignment=a, max_bytes=max_delta_bytes(layout, a)
    )


def residual(work_dir, rnd) -> dict[str, torch.Tensor]:
    from miner.feedback import ResidualStore

    return ResidualStore(work_dir / "rounds").load(rnd)[1]


def delta_file(work_dir, rnd):
    return work_dir / "rounds" / f"{rnd}.delta.safetensors"


def sha(work_dir, rnd) -> str:
    return json.loads((work_dir / "rounds" / f"{rnd}.json").read_text())["trained"]["sha256"]


@pytest.fixture(scope="module")
def other_assignment(test_base, test_assignment, tmp_path_factory):
    """The test assignment without one expert of its largest layer: another hash, other keys."""
    from protocol.moe.experts import Assignment

    a = Assignment.load(test_assignment)
    layer = max(a.layers, key=lambda lay: len(a.layers[lay]))
    layers = {**a.layers, layer: a.layers[layer][:-1]}
    b = dataclasses.replace(a, layers=layers)
    assert b.hash() != a.hash()
    path = tmp_path_factory.mktemp("other-assignment") / "other.json"
    b.save(path)
    return path


def test_error_feedback_across_rounds_resume_and_assignment_change(
    test_base, test_assignment, other_assignment, tmp_path, caplog
):
    base, a = test_base, test_assignment
    work = tmp_path / "miner"
    m = miner(work, base, a)
    m.train(0)
    m.train(1)
    assert (work / "rounds" / "0.residual.safetensors").is_file()
    _, sent1 = read(base, a, delta_file(work, 1))
    r0, r1 = residual(work, 0), residual(work, 1)
    assert sorted(r0) == sorted(sent1) and all(float(t.norm()) > 0 for t in r0.values())

    # The same round 1 without round 0's residual: what it ships differs, and the difference
    # is exactly round 0's residual (sent + kept = this round's delta + what came in).
    alone = tmp_path / "alone"
    shutil.copytree(work, alone)
    (alone / "rounds" / "1.json").unlink()
    (alone / "rounds" / "0.residual.safetensors").unlink()
    miner(alone, base, a).train(1)
    assert sha(alone, 1) != sha(work, 1)
    _, sent1_alone = read(base, a, delta_file(alone, 1))
    r1_alone = residual(alone, 1)
    for k in sent1:
        torch.testing.assert_close(
            sent1[k] + r1[k] - r0[k], sent1_alone[k] + r1_alone[k], atol=1e-6, rtol=1e-4
        )

    # Round 1 re-run after a crash before it was recorded (its own residual already on disk):
    # round 0's residual is used again, and the bytes are the same.
    first = sha(work, 1)
    (work / "rounds" / "1.json").unlink()
    miner(work, base, a).train(1)
    assert sha(work, 1) == first
    torch.testing.assert_close(residual(work, 1), r1, atol=0, rtol=0)

    # Round 2 under another assignment: round 1's residual is dropped (logged), so round 2
    # ships exactly what a miner with no history would.
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        miner(work, base, other_assignment).train(2)
    assert "residual of round 1 dropped" in caplog.text and "assignment" in caplog.text
    fresh = tmp_path / "fresh"
    miner(fresh, base, other_assignment).train(2)
    assert sha(work, 2) == sha(fresh, 2)
    assert not (fresh / "rounds" / "1.residual.safetensors").exists()


def test_lossless_encoding_keeps_no_residual(test_base, test_assignment, tmp_path):
    work = tmp_path / "miner"
    miner(
        work, test_base, test_assignment, train=dataclasses.replace(QUICK, encoding="bfloat16")
    ).train(0)
    assert delta_file(work, 0).is_file()
    assert not list((work / "rounds").glob("*.residual.safetensors"))


def test_a_miners_lowrank8_delta_is_accepted_and_scored(test_base, test_assignment, tmp_path):
    """An honest Miner on lowrank8 runs its round (train, sign, commit, reveal); the
    Validator collects, fetches, reads (decoding the factors) and scores it like any delta."""
    rnd = 1
    ledger = FakeLedger(SCHEDULE)
    owner = FakeChain(ledger, "owner")
    owner.authorise_validator("validator-1")
    FakeChain(ledger, signer("lowrank").identity).register()
    train = dataclasses.replace(HONEST, encoding="lowrank8")
    work = tmp_path / "miner"
    m = miner(
        work,
        test_base,
        test_assignment,
        train=train,
        strategy="honest",
        ledger=ledger,
        name="lowrank",
    )
    store = m.store
    summary = m.run_round(rnd, ledger.mine_to)
    meta, tensors = read(test_base, test_assignment, delta_file(work, rnd))
    assert meta.encoding == "lowrank8"
    assert (work / "rounds" / f"{rnd}.residual.safetensors").is_file()

    ctx = SimpleNamespace(base=test_base, assignment_path=test_assignment)
    v = _validator(ledger, store, ctx, "validator-1", tmp_path / "validator")
    state = v.run_round(rnd, wait=ledger.mine_to)
    outcome = state["evaluate"]["outcomes"][signer("lowrank").identity]
    print(outcome)
    assert outcome.get("rejection") is None
    assert outcome["code"] == OK and outcome["value"] > 0, outcome
    fetched = state["fetch"]["fetched"][signer("lowrank").identity]
    assert fetched["artifact_sha256"] == summary["delta_sha256"]
    # The file holds factors, not dense projections: on this base's [16, 32] projections
    # rank 8 is 3/4 of bf16's data (at [768, 2048] it would be 1.4 %).
    from protocol.artifact.encodings import payload_bytes

    data = delta_file(work, rnd).read_bytes()
    data_len = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert data_len == sum(payload_bytes("lowrank8", tuple(t.shape)) for t in tensors.values())
    assert data_len == 0.75 * 2 * sum(t.numel() for t in tensors.values())


def test_a_round_never_committed_leaves_no_residual_to_the_next(
    test_base, test_assignment, tmp_path, caplog
):
    """Round 0 trained but missed its commit phase: round 1 ships what a miner with no history
    ships. A miner that did commit round 0 carries its residual into round 1."""
    from protocol.round.schedule import phase_bounds

    base, a = test_base, test_assignment
    commit_end = phase_bounds(SCHEDULE, 0, "commit")[1]

    ledger = FakeLedger(SCHEDULE)
    late = miner(tmp_path / "late", base, a, ledger=ledger)
    late.train(0)
    ledger.mine_to(commit_end - 1)
    late.train(1)  # round 0 could still commit: its residual stays and is used
    assert (tmp_path / "late" / "rounds" / "0.residual.safetensors").is_file()
    (tmp_path / "late" / "rounds" / "1.json").unlink()
    ledger.mine_to(commit_end + 1)
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        late.train(1)
    assert "residual of round 0 dropped" in caplog.text and "never committed" in caplog.text
    fresh = miner(tmp_path / "fresh", base, a)
    fresh.train(1)
    assert sha(tmp_path / "late", 1) == sha(tmp_path / "fresh", 1)

    ledger = FakeLedger(SCHEDULE)
    sent = miner(tmp_path / "sent", base, a, ledger=ledger, name="sender")
    FakeChain(ledger, signer("sender").identity).register()
    sent.run_round(0, ledger.mine_to)
    ledger.mine_to(commit_end + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        sent.train(1)
    assert "residual of round 0 added" in caplog.text and "dropped" not in caplog.text
    assert sha(tmp_path / "sent", 1) != sha(tmp_path / "fresh", 1)
