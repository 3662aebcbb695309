"""Cumulative general drift (protocol.round.drift): a lineage of rounds each within the per-round
general tolerance is refused, by the validator's score and by the merger's guard, at the round
whose cumulative rise over the task's original base crosses the cumulative tolerance."""

from __future__ import annotations

import math
import random

import pytest
import torch

from merger.core import BEST_SINGLE, KEPT_PREVIOUS, MERGED, guard
from merger.settings import MergerSettings
from protocol.moe.evaluate import EvalSet, batch_losses
from protocol.moe.model import load_model
from protocol.round import drift
from protocol.round.drift import cumulative_guard, cumulative_rise, original_general_losses
from protocol.round.scoring import GENERAL_REGRESSION, OK, paired_stats, score_submission
from protocol.settings import EvalSettings
from validator.evaluate import score_delta
from validator.settings import ValidatorSettings

TOLERANCE, CUMULATIVE = 0.05, 0.15  # the defaults: per round, and 3x over the original base
STEP = 0.035  # each round's merge raises every general batch's loss by this (within 0.05)
BATCHES = 16


def _lineage(rounds: int) -> list[list[float]]:
    """General losses per batch of the original base (index 0) and of each round's merged
    checkpoint: each round adds STEP (plus noise of 1e-4) to every batch."""
    rng = random.Random(7)
    original = [3.0 + rng.uniform(-0.3, 0.3) for _ in range(BATCHES)]
    return [[x + k * STEP + rng.gauss(0, 1e-4) for x in original] for k in range(rounds + 1)]


def _round_score(base_general, new_general, original):
    """A delta that improves the domain clearly and raises general by one STEP."""
    domain_base = [2.0 + 0.01 * i for i in range(BATCHES)]
    domain_new = [x - 0.05 for x in domain_base]
    score = score_submission(
        paired_stats(domain_base, domain_new),
        paired_stats(base_general, new_general),
        general_tolerance=TOLERANCE,
    )
    return score, cumulative_guard(score, original, new_general, tolerance=CUMULATIVE)


def test_drift_within_each_round_is_refused_at_the_round_that_crosses_the_cumulative_bound():
    """Attack (or slow decay): every round's merge forgets a little, each within the per-round
    tolerance; over rounds the network forgets without limit. Validators refuse the delta of
    the first round whose rise over the ORIGINAL base exceeds the cumulative tolerance."""
    levels = _lineage(8)
    original = levels[0]
    refused = []
    for r in range(8):
        per_round, final = _round_score(levels[r], levels[r + 1], None if r == 0 else original)
        assert per_round.code == OK and per_round.value > 0, per_round.reason  # each round passes
        if final.code == GENERAL_REGRESSION:
            assert final.value == 0 and "cumulative general" in final.reason
            refused.append(r)
    # Cumulative rise after round r's delta: (r + 1) * 0.035 -> 0.14 at r = 3, 0.175 at r = 4.
    assert refused[0] == 4 and refused == list(range(4, 8))


def test_the_merger_guard_keeps_the_previous_checkpoint_at_the_crossing_round():
    levels = _lineage(8)
    original = levels[0]
    decisions = []
    for r in range(8):

        def measured(new, shift=0.0, base=levels[r]):
            return {
                "domain_mean": 2.0 - shift,
                "general_rise": -paired_stats(base, new).lcb,
                "cumulative_rise": cumulative_rise(original, new),
            }

        candidates = {MERGED: measured(levels[r + 1], 0.06), "alice": measured(levels[r + 1], 0.05)}
        decision, _, reason = guard(candidates, TOLERANCE, CUMULATIVE)
        decisions.append(decision)
        if decision == KEPT_PREVIOUS:
            assert "cumulative general rise" in reason
    assert decisions == [MERGED] * 4 + [KEPT_PREVIOUS] * 4
    # A single that stays within both bounds is still published when the merge drifted.
    candidates = {
        MERGED: {"domain_mean": 1.9, "general_rise": 0.01, "cumulative_rise": 0.2},
        "bob": {"domain_mean": 1.95, "general_rise": 0.01, "cumulative_rise": 0.1},
    }
    assert guard(candidates, TOLERANCE, CUMULATIVE)[:2] == (BEST_SINGLE, "bob")


def test_without_an_original_or_a_positive_score_nothing_changes():
    levels = _lineage(6)
    score, final = _round_score(levels[5], levels[6], None)
    assert final == score  # the round builds on the original base: per-round check only
    zero = score_submission(paired_stats([1.0] * 4, [1.0] * 4), paired_stats([1.0] * 4, [1.0] * 4),
                            general_tolerance=TOLERANCE)  # fmt: skip
    assert cumulative_guard(zero, [0.0] * 4, [9.0] * 4, tolerance=CUMULATIVE) == zero
    assert cumulative_rise([1.0, 1.0], [float("nan"), 1.0]) == math.inf  # unmeasurable: refused


def test_the_cumulative_tolerance_is_never_below_the_per_round_one():
    assert ValidatorSettings().cumulative_general_tolerance == pytest.approx(
        3 * EvalSettings().general_tolerance
    )
    with pytest.raises(ValueError, match="cumulative_general_tolerance 0.01 is below"):
        ValidatorSettings(cumulative_general_tolerance=0.01)
    with pytest.raises(ValueError, match="cumulative_general_tolerance 0.01 is below"):
        MergerSettings(cumulative_general_tolerance=0.01)


class _Evaluator:
    """A fake evaluator (unit test): fixed base losses, and fixed losses with any delta."""

    def __init__(self, base_general, new_general):
        self.base_domain = [2.0 + 0.01 * i for i in range(BATCHES)]
        self.base_general, self._new = base_general, new_general

    def evaluate(self, tensors):
        return [x - 0.05 for x in self.base_domain], self._new


def test_score_delta_applies_the_cumulative_bound_to_the_losses_it_measured():
    levels = _lineage(6)
    evaluator = _Evaluator(levels[4], levels[5])
    kept = score_delta(evaluator, {}, general_tolerance=TOLERANCE)
    assert kept.code == OK
    refused = score_delta(evaluator, {}, general_tolerance=TOLERANCE, original_general=levels[0],
                          cumulative_tolerance=CUMULATIVE)  # fmt: skip
    assert refused.code == GENERAL_REGRESSION and "cumulative" in refused.reason


def test_original_general_losses_are_measured_once_per_eval_set(
    random_moe_dir, tmp_path, monkeypatch
):
    g = torch.Generator().manual_seed(0)
    batches = tuple(torch.randint(0, 64, (2, 16), generator=g) for _ in range(3))
    eval_set = EvalSet(seed=11, domain=batches[:2], general=batches)
    cache = tmp_path / "original_general"
    losses = original_general_losses(random_moe_dir, eval_set, cache_dir=cache)
    assert losses == batch_losses(load_model(random_moe_dir), list(batches))

    def measured_again(*args, **kwargs):
        raise LookupError("measured again")

    monkeypatch.setattr(drift, "load_model", measured_again)
    assert original_general_losses(random_moe_dir, eval_set, cache_dir=cache) == losses
    other = EvalSet(seed=12, domain=batches[:2], general=batches[1:])  # another round's batches
    with pytest.raises(LookupError, match="measured again"):  # not served from the cache
        original_general_losses(random_moe_dir, other, cache_dir=cache)
