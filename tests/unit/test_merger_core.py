"""The merger's pure rules: zero-score exclusion, the guard's second set, the model card.

.venv/bin/python -m pytest -q tests/unit/test_merger_core.py
"""

from __future__ import annotations

import math

import pytest

from merger.card import card_facts, model_card
from merger.core import (
    BEST_SINGLE,
    KEPT_PREVIOUS,
    MERGED,
    best_single,
    guard,
    guard_seed,
    split_by_score,
)
from protocol.moe.merge import DiLoCoOuter
from protocol.round.scoring import GENERAL_REGRESSION, NO_IMPROVEMENT, OK

TOL, CUM = 0.05, 0.15


def _m(domain, code=OK, rise=0.0, reason="why"):
    return dict(domain_mean=domain, general_rise=rise, score_code=code, score_reason=reason)


def test_only_deltas_the_rule_pays_this_round_are_merged():
    measured = {
        "bob": _m(2.0),
        "alice": _m(1.9),
        "carol": _m(2.5, NO_IMPROVEMENT, reason="lower bound <= 0.0001"),
        "dave": _m(1.0, GENERAL_REGRESSION, rise=0.3),  # best domain, but forgot
    }
    included, excluded = split_by_score(measured)
    assert included == ["alice", "bob"]
    assert excluded == {
        "carol": {"code": NO_IMPROVEMENT, "reason": "lower bound <= 0.0001"},
        "dave": {"code": GENERAL_REGRESSION, "reason": "why"},
    }
    assert best_single({h: measured[h] for h in included}) == "alice"
    assert split_by_score({"x": _m(1.0, NO_IMPROVEMENT)}) == (
        [],
        {"x": {"code": NO_IMPROVEMENT, "reason": "why"}},
    )
    with pytest.raises(ValueError, match="no single delta"):
        best_single({})


def test_the_guard_decides_on_the_second_set_only():
    # On the selection set the merge won (1.80 < 1.85); on the second set it loses to the
    # single chosen there: the guard, given the second set's numbers, publishes the single.
    selection = {MERGED: _m(1.80), "alice": _m(1.85)}
    second = {MERGED: _m(1.95), "alice": _m(1.90)}
    assert guard(selection, TOL, CUM, base_domain_mean=2.0)[0] == MERGED
    assert guard(second, TOL, CUM, base_domain_mean=2.0)[:2] == (BEST_SINGLE, "alice")
    # A single that won only on the selection set and does not beat the base on the second
    # set is not published either: the previous checkpoint is kept.
    worse = {MERGED: _m(2.05), "alice": _m(2.01)}
    decision, chosen, reason = guard(worse, TOL, CUM, base_domain_mean=2.0)
    assert (decision, chosen) == (KEPT_PREVIOUS, None)
    assert "not below the base's 2" in reason
    # Without the base's number the rule is the old one (a merge within tolerance wins ties).
    assert guard({MERGED: _m(2.0), "a": _m(2.0)}, TOL)[0] == MERGED
    assert guard({MERGED: _m(math.nan), "a": _m(1.0)}, TOL, CUM, 2.0)[0] == BEST_SINGLE


def test_guard_seed_is_derived_reproducible_and_distinct():
    assert guard_seed(12345) == guard_seed(12345)
    assert guard_seed(12345) != guard_seed(12346) != 12346
    assert 0 <= guard_seed(2**63 - 1) < 2**63
    for bad in (-1, True, "1"):
        with pytest.raises(ValueError, match="eval_seed"):
            guard_seed(bad)


def _context(decision=MERGED):
    singles = {
        "0xaaa": dict(domain_mean=1.9, domain_gain=0.1, domain_lcb=0.05, general_mean=3.0),
        "0xbbb": dict(domain_mean=1.95, domain_gain=0.05, domain_lcb=0.01, general_mean=3.0),
    }
    guard_set = dict(
        base_domain_mean=2.0,
        base_general_mean=3.0,
        candidates={MERGED: dict(domain_mean=1.88, general_mean=3.01), "0xaaa": singles["0xaaa"]},
    )
    included = [["0xaaa", "a" * 64, 0.6], ["0xbbb", "b" * 64, 0.4]]
    merge = dict(decision=decision, reason="merge beats", included=included, guard=guard_set)
    merge.update(candidates={MERGED: dict(domain_mean=1.87), **singles}, best_single="0xaaa")
    return dict(
        round=3, state={"merge": merge}, chain="fake:1", task_id=0,
        original_base_digest="0" * 64, round_base_digest="1" * 64, built_on_round=2,
        method="diloco", base_model="org/base",
    )  # fmt: skip


def test_model_card_lists_lineage_deltas_losses_and_is_deterministic():
    outer = DiLoCoOuter(lr=0.7, momentum=0.9, steps=4)
    text = model_card(card_facts(_context(), outer))
    assert text == model_card(card_facts(_context(), outer))  # same facts, same bytes
    head = text.split("---")[1]
    assert "base_model: org/base" in head and "library_name: transformers" in head
    for needle in (
        "original base (task 0): `" + "0" * 64,
        "the checkpoint `" + "1" * 64,
        "| `0xaaa` | `" + "a" * 64 + "` | 0.100000 | 0.050000 | 0.600000 |",
        "| this checkpoint | 1.880000 | 3.010000 |",
        "| round's base | 2.000000 | 3.000000 |",
        "lr 0.7, momentum 0.9, nesterov true, steps taken: 4",
        "--round 2 --out base",
        "moesaic store get " + "b" * 64,
        "--weights 0.6,0.4 --method diloco --outer-lr 0.7 --outer-momentum 0.9",
    ):
        assert needle in text, needle
    # A round that published the best single: the guard row is that single's, method average.
    single = _context(BEST_SINGLE)
    single["state"]["merge"]["included"] = [["0xaaa", "a" * 64, 1.0]]
    text = model_card(card_facts(single, None))
    assert "| this checkpoint | 1.900000 | 3.000000 |" in text
    assert "--weights 1.0 --method average --out recomputed" in text
    assert "base_model" not in model_card(card_facts({**_context(), "base_model": ""}, outer))
    composed = _context("composed")
    composed["state"]["merge"]["tasks"] = {"0": {}, "1": {}}
    assert "no single command does both" in model_card(card_facts(composed, None))
