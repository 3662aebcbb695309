"""miner.optimizer_state: the inner AdamW state kept across rounds (train.keep_optimizer).

Saved after a round, loaded by the next and used (its first step differs from a fresh
optimizer's on the same batches), refused cleanly (a fresh AdamW, the reason logged) when it
was kept for another assignment, other shapes, or cannot be read; a kill while saving leaves
the earlier state whole, and a round trained again starts from the same state as before.
"""

from __future__ import annotations

import logging

import pytest
import torch

from miner.optimizer_state import OptimizerKeeper
from miner.teft import train_experts
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, load_model
from protocol.moe.train import TrainConfig
from protocol.settings import TrainSettings


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 128, (4, 16), generator=g)


@pytest.fixture(scope="module")
def world(random_moe_dir):
    model = load_model(random_moe_dir)
    return model, expert_layout(model)


def _round(world, assignment, rnd: int, keeper_dir=None, steps: int = 3):
    """One round's delta (batches seeded by the round), with the state kept in keeper_dir."""
    model, layout = world
    keeper = OptimizerKeeper(keeper_dir, rnd, assignment.hash()) if keeper_dir else None
    cfg = TrainConfig(TrainSettings(steps=steps, lr=1e-2), warmup=1)
    delta, _ = train_experts(
        model, layout, assignment, _batches(rnd), cfg, progress=False, keeper=keeper
    )
    return delta


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_state_is_saved_loaded_and_used_by_the_next_round(
    world, random_assignment, tmp_path, caplog
):
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        _round(world, random_assignment, 0, tmp_path)
    assert "no kept optimizer state" in caplog.text
    saved = torch.load(tmp_path / "optimizer.0.pt", weights_only=True)
    assert saved["assignment_hash"] == random_assignment.hash() and saved["round"] == 0
    moments = [s["exp_avg"] for s in saved["optimizer"]["state"].values()]
    assert moments and all(float(m.abs().max()) > 0 for m in moments)

    # Round 1's first step: with round 0's moments it moves elsewhere than a fresh AdamW.
    fresh = _round(world, random_assignment, 1, steps=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        kept = _round(world, random_assignment, 1, tmp_path, steps=1)
    assert "optimizer state of round 0 loaded" in caplog.text
    assert not _same(fresh, kept)
    assert (tmp_path / "optimizer.1.pt").is_file()


def test_a_round_trained_again_starts_from_the_same_state(world, random_assignment, tmp_path):
    """A miner killed after saving round 1's state, before recording its delta, retrains round
    1: from round 0's state again, not from the one its killed run wrote."""
    _round(world, random_assignment, 0, tmp_path)
    first = _round(world, random_assignment, 1, tmp_path)
    again = _round(world, random_assignment, 1, tmp_path)
    assert _same(first, again)
    _round(world, random_assignment, 2, tmp_path)  # loads 1, keeps 1 and 2, drops 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.1.pt", "optimizer.2.pt"]


def test_a_kill_while_saving_leaves_the_earlier_state_whole(
    world, random_assignment, tmp_path, monkeypatch
):
    import miner.optimizer_state as state

    _round(world, random_assignment, 0, tmp_path)
    before = (tmp_path / "optimizer.0.pt").read_bytes()

    def killed(path, data):
        raise KeyboardInterrupt  # the process dies before the atomic rename

    monkeypatch.setattr(state, "write_bytes_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _round(world, random_assignment, 1, tmp_path)
    assert (tmp_path / "optimizer.0.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["optimizer.0.pt"]


def _other_assignment(random_assignment) -> Assignment:
    return Assignment(
        layers={0: (1,), 1: (0, 2)},
        method="token-ratio",
        p=0.2,
        model_hash=random_assignment.model_hash,
        num_experts=8,
    )


def _tamper_shapes(path):
    saved = torch.load(path, weights_only=True)
    saved["shapes"][0][0] += 1
    torch.save(saved, path)


@pytest.mark.parametrize(
    "spoil, reason",
    [
        ("assignment", "kept for assignment"),
        ("shapes", "parameter shapes"),
        ("truncated", "unreadable"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_training_starts_fresh(
    world, random_assignment, tmp_path, caplog, spoil, reason
):
    saved_for = _other_assignment(random_assignment) if spoil == "assignment" else None
    _round(world, saved_for or random_assignment, 0, tmp_path)
    path = tmp_path / "optimizer.0.pt"
    if spoil == "shapes":
        _tamper_shapes(path)
    elif spoil == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    fresh = _round(world, random_assignment, 1, steps=1)
    with caplog.at_level(logging.INFO, logger="moesaic.miner"):
        kept = _round(world, random_assignment, 1, tmp_path, steps=1)
    assert "optimizer state of round 0 not used" in caplog.text and reason in caplog.text
    assert _same(fresh, kept)  # exactly a fresh AdamW's round


def test_the_miner_keeps_it_only_when_asked():
    with pytest.raises(ValueError, match="keep_optimizer must be true or false"):
        TrainSettings(keep_optimizer="yes")
    assert TrainSettings().keep_optimizer is False
