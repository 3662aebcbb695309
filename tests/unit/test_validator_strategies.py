"""Dishonest validator behaviours (validator.strategies) and their settings, on a fake chain."""

from __future__ import annotations

import pytest

from protocol.chain.fake import FakeChain, FakeLedger
from protocol.config import build
from protocol.round.schedule import Schedule
from validator.settings import ValidatorSettings
from validator.strategies import (
    COLLUDING,
    COPIER,
    HONEST,
    STRATEGIES,
    colluding_weights,
    copied_weights,
    strategy_weights,
)

SCHEDULE = Schedule(train=4, commit=8, reveal=2, evaluate=2, weights=4, merge=2)
COMPUTED = ([1, 2], [0.25, 0.75])  # what the validator measured


@pytest.fixture
def chain():
    """Validators v1 (uid 0), v2 (uid 1), v3 (uid 2); miners m1..m3 (uids 3..5); weights that
    v1 and v2 set in rounds 0 and 1 (round 2 is the one being scored)."""
    ledger = FakeLedger(SCHEDULE)
    owner = FakeChain(ledger, "owner")
    for v in ("v1", "v2", "v3"):
        owner.authorise_validator(v)
    for m in ("m1", "m2", "m3"):
        FakeChain(ledger, m).register()
    ledger.weights = {
        0: {0: {3: 100}, 1: {4: 100}},
        1: {1: {3: 1, 5: 3}},  # v2 only: v1 set nothing in round 1
    }
    return ledger


def _settings(**kw) -> ValidatorSettings:
    return build(ValidatorSettings, kw)


def test_honest_sets_what_it_computed(chain):
    got = strategy_weights(_settings(), FakeChain(chain, "v3"), "v3", 2, *COMPUTED)
    assert got == COMPUTED


def test_colluding_gives_all_weight_to_its_miner_whatever_it_measured(chain):
    s = _settings(strategy=COLLUDING, collude_with="m3")
    assert strategy_weights(s, FakeChain(chain, "v3"), "v3", 2, *COMPUTED) == ([5], [1.0])
    # a miner that is not registered leaves nothing to set
    members = FakeChain(chain, "v3").members()
    assert colluding_weights(members, "nobody") == ([], [])
    assert colluding_weights(members, " m1 ") == ([3], [1.0])


def test_copier_sets_the_newest_weights_another_validator_set_before_this_round(chain):
    s = _settings(strategy=COPIER)
    # round 2: the newest visible are round 1's, from v2 (uid 1), normalised
    got = strategy_weights(s, FakeChain(chain, "v3"), "v3", 2, *COMPUTED)
    assert got == ([3, 5], [0.25, 0.75])
    # v2 copying: its own round-1 weights do not count, so round 0's of v1 (uid 0)
    assert strategy_weights(s, FakeChain(chain, "v2"), "v2", 2, *COMPUTED) == ([3], [1.0])
    # copy_from names the source; round 1 is skipped because v1 set nothing there
    s = _settings(strategy=COPIER, copy_from="v1")
    assert strategy_weights(s, FakeChain(chain, "v3"), "v3", 2, *COMPUTED) == ([3], [1.0])
    # the current round's weights are never copied, and round 0 has nothing before it
    assert strategy_weights(s, FakeChain(chain, "v3"), "v3", 0, *COMPUTED) == ([], [])


def test_copied_weights_ignore_zero_rows_and_unknown_sources():
    history = [(4, {0: {1: 0, 2: 0}, 7: {3: 5}}), (3, {1: {2: 1}})]
    assert copied_weights(history, own_uid=9, source_uid=None) == ([3], [1.0])
    assert copied_weights(history, own_uid=7, source_uid=None) == ([2], [1.0])
    assert copied_weights(history, own_uid=9, source_uid=-2) == ([], [])


def test_strategy_settings_are_checked_at_construction():
    assert _settings().strategy == HONEST and set(STRATEGIES) == {HONEST, COLLUDING, COPIER}
    with pytest.raises(ValueError, match="strategy must be one of"):
        _settings(strategy="lazy")
    with pytest.raises(ValueError, match="needs collude_with"):
        _settings(strategy=COLLUDING)
    with pytest.raises(ValueError, match='only for strategy "colluding"'):
        _settings(collude_with="m1")
    with pytest.raises(ValueError, match='only for strategy "copier"'):
        _settings(strategy=COLLUDING, collude_with="m1", copy_from="v1")
    with pytest.raises(ValueError, match="without spaces"):
        _settings(strategy=COLLUDING, collude_with=" m1")
