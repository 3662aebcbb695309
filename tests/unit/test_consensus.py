"""The validators' robust consensus and standing on tiny inputs: colluders, copiers, honest noise.

Each attack is run against the pure rule (protocol.round.consensus) and the merger's use of it
(merger.core.validator_consensus); the integration test with real validators and a merger is
tests/integration/test_dishonest_validators.py.
"""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merger.core import validator_consensus
from protocol.chain import Member
from protocol.round.consensus import (
    GENESIS_STANDING,
    normalised,
    robust_consensus,
    start_standing,
    update_standing,
    weighted_median,
)

ALPHA = 0.3
HONEST = {1: 0.5, 2: 0.5}  # two honest miners (uids 1, 2) earned equally; 9 is the lazy one
COLLUDING = {9: 1.0}


def _rounds(votes_per_round, alpha=ALPHA, standing=None):
    """Run rounds of votes through consensus and standing; (last result, standing after)."""
    standing = dict(standing or {})
    result = None
    for votes in votes_per_round:
        used = start_standing(standing, votes)
        result = robust_consensus(votes, used)
        standing = update_standing({**standing, **used}, result.agreement, alpha)
    return result, standing


# ----------------------------------------------------------------------------- the median


def test_weighted_median_of_equal_weights_is_the_ordinary_median():
    assert weighted_median([0.0, 1.0, 0.2], [1, 1, 1]) == 0.2
    assert weighted_median([0.0, 1.0], [1, 1]) == 0.5  # exactly half: the mean of the two
    assert weighted_median([0.0, 0.1, 0.3, 1.0], [1, 1, 1, 1]) == pytest.approx(0.2)


def test_weighted_median_follows_the_weights():
    assert weighted_median([0.0, 1.0], [1, 3]) == 1.0
    assert weighted_median([0.0, 1.0], [3, 1]) == 0.0
    assert weighted_median([0.0, 1.0, 1.0], [0.0, 1.0, 0.0]) == 1.0  # zero weight: no voice
    assert weighted_median([0.0, 1.0], [0.0, 0.0]) == 0.5  # nobody has weight: all count equally
    with pytest.raises(ValueError, match="no values"):
        weighted_median([], [])


def test_normalised_refuses_negative_and_non_finite_weights():
    assert normalised({1: 3, 2: 1}) == {1: 0.75, 2: 0.25}
    assert normalised({1: 0, 2: 0}) == {1: 0.0, 2: 0.0}
    for bad in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="uid 1"):
            normalised({1: bad})


# ----------------------------------------------------------------------------- colluders


def test_one_colluding_validator_of_three_gives_its_miner_nothing():
    votes = {"honest-a": HONEST, "honest-b": HONEST, "colluder": COLLUDING}
    result = robust_consensus(votes, dict.fromkeys(votes, 1.0))
    assert result.medians[9] == 0.0
    assert result.weights == pytest.approx({1: 0.5, 2: 0.5})
    assert 9 not in result.weights  # never merged
    assert result.agreement == pytest.approx({"honest-a": 1.0, "honest-b": 1.0, "colluder": 0.0})


def test_a_colluding_validators_standing_drops_and_keeps_dropping():
    votes = {"honest-a": HONEST, "honest-b": HONEST, "colluder": COLLUDING}
    _, after_one = _rounds([votes])
    assert after_one["colluder"] == pytest.approx(1 - ALPHA)
    assert after_one["honest-a"] == after_one["honest-b"] == GENESIS_STANDING
    _, after_ten = _rounds([votes] * 10)
    assert after_ten["colluder"] == pytest.approx((1 - ALPHA) ** 10)  # 0.028
    assert after_ten["honest-a"] == GENESIS_STANDING


def test_one_colluding_validator_of_two_takes_what_the_plain_mean_gives():
    """Two validators of equal standing each hold exactly half: the median is the mean of the
    two, clipping takes nothing off, and the colluder's miner gets half of the consensus, as
    with the plain mean. Neither loses standing against the other: with two opinions nobody
    can tell which one is the lie. A network needs three validators or more."""
    votes = {"honest": HONEST, "colluder": COLLUDING}
    result, standing = _rounds([votes] * 5)
    assert result.medians == pytest.approx({1: 0.25, 2: 0.25, 9: 0.5})
    assert result.weights == pytest.approx({1: 0.25, 2: 0.25, 9: 0.5})
    assert result.agreement["honest"] == pytest.approx(result.agreement["colluder"]) == 0.5
    assert standing["honest"] == pytest.approx(standing["colluder"])


def test_colluders_with_half_or_more_of_the_standing_steer_the_consensus():
    """The limit, shown: the rule tolerates colluders holding under half of the standing only."""
    half = {"h1": HONEST, "h2": HONEST, "c1": COLLUDING, "c2": COLLUDING}
    assert robust_consensus(half, dict.fromkeys(half, 1.0)).weights[9] == pytest.approx(0.5)
    majority = {"h1": HONEST, "c1": COLLUDING, "c2": COLLUDING}
    assert robust_consensus(majority, dict.fromkeys(majority, 1.0)).weights == {9: 1.0}
    # Two of five with equal standing are under half: their miner gets nothing.
    five = {**half, "h3": HONEST}
    assert 9 not in robust_consensus(five, dict.fromkeys(five, 1.0)).weights


def test_colluders_who_lost_standing_cannot_win_back_a_majority_by_numbers():
    """Two of three validators collude against an honest one whose standing is established:
    they hold 2/3 of the heads but (0.1 + 0.1) / 1.2 of the standing, so their miner gets 0."""
    votes = {"honest": HONEST, "c1": COLLUDING, "c2": COLLUDING}
    result = robust_consensus(votes, {"honest": 1.0, "c1": 0.1, "c2": 0.1})
    assert result.weights == pytest.approx({1: 0.5, 2: 0.5})


@settings(max_examples=200, deadline=None)
@given(
    honest=st.lists(
        st.dictionaries(st.integers(0, 4), st.integers(0, 65535), min_size=1, max_size=5),
        min_size=2,
        max_size=5,
    ),
    colluders=st.integers(0, 4),
    data=st.data(),
)
def test_colluders_under_half_the_standing_cannot_lift_a_miner_above_every_honest_weight(
    honest, colluders, data
):
    """Whatever the honest validators set, colluders holding under half of the standing leave
    every miner's median between the honest validators' lowest and highest weight for it."""
    colluders = min(colluders, len(honest) - 1)
    stake_h = [data.draw(st.floats(0.5, 1.0)) for _ in honest]
    stake_c = [0.99 * sum(stake_h) / max(colluders, 1)] * colluders  # together under half
    votes = {f"h{i}": w for i, w in enumerate(honest)}
    votes.update({f"c{i}": {9: 1, 4: 65535} for i in range(colluders)})
    standing = dict(zip(votes, [*stake_h, *stake_c], strict=True))
    result = robust_consensus(votes, standing)
    rows = {v: normalised(w) for v, w in votes.items()}
    for uid, median in result.medians.items():
        column = [rows[f"h{i}"].get(uid, 0.0) for i in range(len(honest))]
        assert min(column) - 1e-12 <= median <= max(column) + 1e-12
    assert math.fsum(result.weights.values()) == pytest.approx(1.0) or not result.weights


# ----------------------------------------------------------------------------- copiers


def test_a_weight_copier_loses_standing_when_the_scores_move():
    """Each round the miners' scores move; the copier reveals the previous round's consensus
    (the newest weights it can see once weights are committed before they are revealed)."""
    honest_rounds = [
        ({1: 0.5, 2: 0.5}, {1: 0.45, 2: 0.55}),
        ({1: 0.2, 2: 0.3, 3: 0.5}, {1: 0.25, 2: 0.25, 3: 0.5}),
        ({2: 0.3, 3: 0.3, 4: 0.4}, {2: 0.35, 3: 0.25, 4: 0.4}),
        ({1: 0.6, 4: 0.4}, {1: 0.55, 4: 0.45}),
    ]
    standing, previous = {}, {}
    for a, b in honest_rounds:
        votes = {"honest-a": a, "honest-b": b}
        if previous:  # nothing to copy in the first round: it stays silent
            votes["copier"] = previous
        used = start_standing(standing, [*votes, "copier"])
        result = robust_consensus(votes, used)
        standing = update_standing({**standing, **used}, result.agreement, ALPHA)
        if previous:
            honest = min(result.agreement["honest-a"], result.agreement["honest-b"])
            assert result.agreement["copier"] < honest
        previous = result.weights
    print(standing)
    assert standing["copier"] < 0.8 * min(standing["honest-a"], standing["honest-b"])
    assert min(standing["honest-a"], standing["honest-b"]) > 0.9


def test_a_copier_of_weights_that_do_not_move_is_not_told_apart():
    """The limit, shown: while the scores stand still, last round's weights are this round's."""
    votes = {"honest-a": HONEST, "honest-b": HONEST, "copier": HONEST}
    _, standing = _rounds([votes] * 5)
    assert standing["copier"] == pytest.approx(standing["honest-a"]) == GENESIS_STANDING


# ----------------------------------------------------------------------------- honest noise


def test_honest_validators_that_disagree_a_little_keep_most_standing():
    rounds = [
        {
            "a": {1: 0.50, 2: 0.30, 3: 0.20},
            "b": {1: 0.45, 2: 0.35, 3: 0.20},
            "c": {1: 0.55, 2: 0.25, 3: 0.15, 4: 0.05},
        },
        {
            "a": {1: 0.40, 2: 0.40, 3: 0.20},
            "b": {1: 0.42, 2: 0.33, 3: 0.25},
            "c": {1: 0.38, 2: 0.42, 3: 0.20},
        },
    ] * 5
    result, standing = _rounds(rounds)
    assert min(result.agreement.values()) > 0.85
    assert min(standing.values()) > 0.85
    assert sorted(result.weights) == [1, 2, 3]  # the one-validator miner 4 has no support


# ----------------------------------------------------------------------------- standing


def test_standing_without_evidence_is_kept():
    standing = {"a": 0.9, "b": 0.4}
    # b did not vote; a voted in a round where nobody had consensus
    assert update_standing(standing, {"a": None}, ALPHA) == standing
    assert update_standing(standing, {"a": 0.0}, ALPHA) == {"a": pytest.approx(0.63), "b": 0.4}
    everyone_zero = robust_consensus({"a": {1: 0}, "b": {}}, {"a": 1.0, "b": 1.0})
    assert everyone_zero.weights == {} and everyone_zero.agreement == {"a": None, "b": None}
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match="alpha"):
            update_standing(standing, {}, bad)


def test_start_standing_is_equal_at_genesis_and_the_median_for_a_newcomer():
    assert start_standing({}, ["a", "b"]) == {"a": GENESIS_STANDING, "b": GENESIS_STANDING}
    assert start_standing({"a": 0.9, "b": 0.1, "c": 0.8}, ["a", "new"]) == {"a": 0.9, "new": 0.8}


def test_voters_without_standing_or_with_bad_standing_are_refused():
    with pytest.raises(ValueError, match="without a standing"):
        robust_consensus({"a": HONEST}, {})
    with pytest.raises(ValueError, match="finite and >= 0"):
        robust_consensus({"a": HONEST}, {"a": -1.0})


def test_voters_with_no_standing_left_count_equally():
    votes = {"a": HONEST, "b": HONEST, "c": COLLUDING}
    result = robust_consensus(votes, dict.fromkeys(votes, 0.0))
    assert result.weights == pytest.approx({1: 0.5, 2: 0.5})


# ----------------------------------------------------------------------------- the merger's view


def _member(uid, hotkey, permit):
    return Member(uid=uid, hotkey=hotkey, stake=0.0, validator_permit=permit)


MEMBERS = [
    _member(0, "0xAaAa000000000000000000000000000000000000", True),
    _member(1, "0xbbbb000000000000000000000000000000000000", True),
    _member(2, "0xcccc000000000000000000000000000000000000", True),
    _member(3, "0xdddd000000000000000000000000000000000000", False),  # no permit
    _member(4, "miner-a", False),
    _member(5, "miner-b", False),
    _member(6, "miner-lazy", False),
]
ON_CHAIN = {  # as the chain holds them: u16 weights per validator uid
    0: {4: 32768, 5: 32767},
    1: {4: 30000, 5: 35535},
    2: {6: 65535},  # colluding with the lazy miner
    3: {6: 65535},  # no permit: not a vote
}


def test_the_merger_gives_the_colluded_miner_zero_and_records_each_validators_standing():
    consensus, records, carried = validator_consensus(ON_CHAIN, MEMBERS, {}, ALPHA)
    assert set(consensus) == {4, 5} and 6 not in consensus
    assert sorted(records) == [m.hotkey.lower() for m in MEMBERS[:3]]  # the permitted ones
    colluder = records["0xcccc000000000000000000000000000000000000"]
    assert colluder["uid"] == 2 and colluder["voted"] and colluder["agreement"] == 0.0
    assert colluder["standing"] == GENESIS_STANDING
    assert colluder["standing_after"] == pytest.approx(1 - ALPHA)
    honest = records["0xaaaa000000000000000000000000000000000000"]
    assert honest["hotkey"] == MEMBERS[0].hotkey and honest["agreement"] > 0.95
    assert carried == {h: r["standing_after"] for h, r in records.items()}


def test_the_merger_carries_standing_by_hotkey_not_uid():
    _, _, carried = validator_consensus(ON_CHAIN, MEMBERS, {}, ALPHA)
    _, _, carried = validator_consensus(ON_CHAIN, MEMBERS, carried, ALPHA)
    colluder = "0xcccc000000000000000000000000000000000000"
    assert carried[colluder] == pytest.approx((1 - ALPHA) ** 2)
    # The colluder's uid 2 is now another key's: it starts from the median, not the colluder's.
    members = [*MEMBERS[:2], _member(2, "0xeeee000000000000000000000000000000000000", True)]
    _, records, after = validator_consensus({}, [*members, *MEMBERS[3:]], carried, ALPHA)
    newcomer = records["0xeeee000000000000000000000000000000000000"]
    assert newcomer["standing"] == statistics.median(carried.values()) and not newcomer["voted"]
    assert after[colluder] == carried[colluder]  # kept, should the key come back
