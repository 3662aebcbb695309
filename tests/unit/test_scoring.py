"""Validator scoring rules on tiny inputs: t bounds, score codes, duplicates, EMA, weights."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.chain import u16_weights
from protocol.round.scoring import (
    DUPLICATE,
    GENERAL_REGRESSION,
    INVALID,
    NO_IMPROVEMENT,
    NO_SUBMISSION,
    NON_FINITE,
    OK,
    TOO_FEW_BATCHES,
    Duplicate,
    Entry,
    PairedStats,
    Score,
    explain_rows,
    final_scores,
    find_duplicates,
    moving_average,
    paired_stats,
    score_submission,
    seeded_tiebreak,
    weights_from_scores,
)
from protocol.round.stats import t_cdf, t_quantile


def test_module_imports_neither_torch_nor_numpy():
    import subprocess
    import sys

    code = (
        "import sys, protocol.round.scoring; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- Student t


@pytest.mark.parametrize(
    "p, df, table",
    [
        (0.95, 1, 6.3138),
        (0.95, 2, 2.9200),
        (0.95, 5, 2.0150),
        (0.95, 30, 1.6973),
        (0.975, 10, 2.2281),
        (0.99, 20, 2.5280),
        (0.995, 3, 5.8409),
        (0.95, 1e6, 1.6449),
        (0.95, math.inf, 1.6449),
    ],
)
def test_t_quantile_matches_tables(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4)


def test_t_quantile_matches_closed_forms_for_one_and_two_df():
    for p in (0.6, 0.9, 0.99, 0.9999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx(
            (2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10
        )


def test_t_quantile_symmetry_median_and_continuity_at_large_df():
    assert t_quantile(0.5, 7) == 0.0
    assert t_quantile(0.05, 4) == pytest.approx(-t_quantile(0.95, 4))
    # The Cornish-Fisher branch above df = 1e5 joins the exact one smoothly.
    assert t_quantile(0.95, 1e5) == pytest.approx(t_quantile(0.95, 1e5 + 1), abs=1e-8)


def test_t_rejects_bad_arguments():
    for p in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(ValueError):
            t_quantile(p, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError):
        t_cdf(math.nan, 3)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5001, 0.9999), st.integers(1, 500))
def test_t_cdf_inverts_t_quantile(p, df):
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.55, 0.999), st.integers(1, 200))
def test_t_quantile_falls_with_df_toward_normal(p, df):
    assert t_quantile(p, df) > t_quantile(p, df + 1) > t_quantile(p, math.inf)


# ----------------------------------------------------------------------------- paired stats


def test_paired_stats_numbers():
    s = paired_stats([1.0, 2.0, 3.0, 4.0], [0.9, 1.8, 2.9, 3.7])
    d = [0.1, 0.2, 0.1, 0.3]
    assert s.valid and s.n == 4
    assert s.mean == pytest.approx(sum(d) / 4)
    assert s.stdev == pytest.approx(0.095742710775633)
    assert s.stderr == pytest.approx(s.stdev / 2)
    half = 2.353363 * s.stderr  # t_{0.95, 3}
    assert s.lcb == pytest.approx(s.mean - half, rel=1e-6)
    assert s.ucb == pytest.approx(s.mean + half, rel=1e-6)
    assert s.lcb < s.mean < s.ucb


def test_lcb_tightens_with_more_batches():
    base = [2.0, 2.1, 1.9, 2.05]
    new = [1.9, 2.05, 1.85, 1.9]
    few, many = paired_stats(base, new), paired_stats(base * 4, new * 4)
    assert few.mean == pytest.approx(many.mean)
    assert few.lcb < many.lcb < many.mean
    assert many.ucb - many.lcb < few.ucb - few.lcb


def test_higher_confidence_widens_the_bound():
    base, new = [2.0, 2.1, 1.9, 2.05], [1.9, 2.05, 1.85, 1.9]
    assert paired_stats(base, new, confidence=0.99).lcb < paired_stats(base, new).lcb
    assert paired_stats(base, new, confidence=0.5).lcb == pytest.approx(
        paired_stats(base, new).mean
    )


def test_constant_improvement_has_zero_width():
    s = paired_stats([2.0, 3.0, 4.0], [1.5, 2.5, 3.5])
    assert s.stdev == 0 and s.lcb == s.mean == s.ucb == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_batch_invalidates_an_otherwise_great_delta(bad):
    # Huge gains on 5 batches, blows up on one: dropping that batch would reward it.
    s = paired_stats([3.0] * 6, [1.0, 1.0, bad, 1.0, 1.0, 1.0])
    assert not s.valid and s.invalid == NON_FINITE
    assert "#2=" in s.detail and "1 of 6" in s.detail
    assert math.isnan(s.lcb) and not s.lcb > 0


def test_too_few_batches_is_invalid():
    for base, new in (([], []), ([1.0], [0.5])):
        s = paired_stats(base, new)
        assert s.invalid == TOO_FEW_BATCHES and not s.valid


def test_caller_errors_raise():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="base loss"):
        paired_stats([1.0, math.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_stats([1.0, 2.0], [1.0, 1.0], confidence=1.0)


finite = st.floats(-50, 50, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=30), st.floats(0.5, 0.999))
def test_lcb_le_mean_le_ucb(pairs, confidence):
    s = paired_stats([b for b, _ in pairs], [n for _, n in pairs], confidence=confidence)
    assert s.valid
    assert s.lcb <= s.mean <= s.ucb
    assert s.ucb - s.mean == pytest.approx(s.mean - s.lcb, abs=1e-9)


# ----------------------------------------------------------------------------- score


def stats(mean, half, n=10, confidence=0.95):
    """PairedStats with a chosen mean and bound half-width."""
    return PairedStats(n, mean, 1.0, 0.1, mean - half, mean + half, confidence)


def test_ok_score_is_the_lower_bound_with_numbers_in_the_reason():
    s = score_submission(
        stats(0.041, 0.009), stats(0.0, 0.002), general_tolerance=0.01, domain_name="math"
    )
    assert s.code == OK and s.value == pytest.approx(0.032)
    assert (s.domain_lcb, s.domain_mean, s.general_mean) == (pytest.approx(0.032), 0.041, 0.0)
    assert (
        "math: loss improvement 0.041 nats/batch (95% bounds 0.032..0.05, 10 batches)" in s.reason
    )
    assert "tolerance 0.01" in s.reason


def test_noisy_positive_mean_with_negative_lcb_earns_nothing():
    base = [2.0, 2.0, 2.0, 2.0, 2.0]
    new = [1.5, 2.4, 1.6, 2.3, 1.9]  # mean gain 0.06, very noisy
    domain = paired_stats(base, new)
    assert domain.mean > 0 > domain.lcb
    s = score_submission(domain, stats(0.0, 0.001), general_tolerance=0.01)
    assert s.code == NO_IMPROVEMENT and s.value == 0.0
    assert "not distinguishable from noise" in s.reason


def test_general_regression_beyond_tolerance_zeroes_a_good_delta():
    s = score_submission(stats(0.05, 0.01), stats(-0.03, 0.01), general_tolerance=0.01)
    assert s.code == GENERAL_REGRESSION and s.value == 0.0
    assert (
        "loss rise 0.03 nats/batch" in s.reason and "upper bound 0.04 > tolerance 0.01" in s.reason
    )
    assert s.domain_mean == 0.05  # still reported so the miner sees what it gave up


def test_general_rule_uses_the_upper_bound_of_the_rise_not_the_mean():
    # Mean rise 0.005 is within tolerance, but it could be 0.015 at 95 %: not proven safe.
    noisy = score_submission(stats(0.05, 0.01), stats(-0.005, 0.010), general_tolerance=0.01)
    assert noisy.code == GENERAL_REGRESSION
    tight = score_submission(stats(0.05, 0.01), stats(-0.005, 0.004), general_tolerance=0.01)
    assert tight.code == OK
    # A general improvement never counts as regression.
    better = score_submission(stats(0.05, 0.01), stats(0.02, 0.01), general_tolerance=0.0)
    assert better.code == OK


def test_invalid_evaluations_score_zero_with_the_reason():
    broken = paired_stats([2.0, 2.0, 2.0], [1.0, math.nan, 1.0])
    s = score_submission(broken, stats(0.0, 0.001), general_tolerance=0.01, domain_name="math")
    assert s.code == INVALID and s.value == 0.0 and s.domain_lcb is None
    assert s.reason.startswith("math evaluation invalid (non_finite)")
    g = score_submission(stats(0.05, 0.01), paired_stats([1.0], [1.0]), general_tolerance=0.01)
    assert g.code == INVALID and "general" in g.reason and TOO_FEW_BATCHES in g.reason


def test_bad_tolerance_raises():
    for tol in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="general_tolerance"):
            score_submission(stats(0.05, 0.01), stats(0, 0.01), general_tolerance=tol)


# ----------------------------------------------------------------------------- duplicates


def test_exact_digest_copy_loses_to_the_earlier_committer():
    entries = [
        Entry("copier", "AA" * 32, 12),
        Entry("orig", "aa" * 32, 10),
        Entry("x", "bb" * 32, 11),
    ]
    dups = find_duplicates(entries, {})
    assert set(dups) == {"copier"}
    d = dups["copier"]
    assert (d.original, d.matched, d.kind, d.similarity) == ("orig", "orig", "digest", None)
    assert (d.block, d.original_block) == (12, 10)
    assert "same artifact digest" in d.reason and "earlier committer keeps" in d.reason


def test_near_duplicate_by_similarity_either_key_order_or_callable():
    entries = [Entry("a", "01", 5), Entry("b", "02", 7), Entry("c", "03", 6)]
    sims = {("b", "a"): 0.97, ("a", "c"): 0.90, ("b", "c"): 0.10}
    dups = find_duplicates(entries, sims, threshold=0.95)
    assert set(dups) == {"b"} and dups["b"].original == "a" and dups["b"].kind == "similarity"
    assert dups["b"].similarity == 0.97 and "cosine similarity 0.9700" in dups["b"].reason

    def fn(x, y):
        return sims.get((x, y), sims.get((y, x), 0.0))

    assert find_duplicates(entries, fn, threshold=0.95) == dups
    assert set(find_duplicates(entries, sims, threshold=0.9)) == {"b", "c"}


def test_threshold_is_inclusive_and_missing_pairs_are_not_similar():
    entries = [Entry("a", "01", 1), Entry("b", "02", 2)]
    assert set(find_duplicates(entries, {("a", "b"): 0.95})) == {"b"}
    assert find_duplicates(entries, {}) == {}


def test_same_block_ties_break_by_tiebreak_then_hotkey():
    same = [Entry("zed", "aa", 9, tiebreak=1), Entry("amy", "aa", 9, tiebreak=2)]
    assert set(find_duplicates(same, {})) == {"amy"}
    flat = [Entry("zed", "aa", 9), Entry("amy", "aa", 9)]
    assert set(find_duplicates(flat, {})) == {"zed"}
    assert set(find_duplicates(list(reversed(flat)), {})) == {"zed"}


def test_chains_of_copies_all_point_to_the_original():
    entries = [Entry("a", "01", 1), Entry("b", "02", 2), Entry("c", "03", 3), Entry("d", "01", 4)]
    # c copied b (not similar to a any more); b copied a; d re-posted a's artifact.
    sims = {("a", "b"): 0.99, ("b", "c"): 0.99, ("a", "c"): 0.80}
    dups = find_duplicates(entries, sims)
    assert {h: d.original for h, d in dups.items()} == {"b": "a", "c": "a", "d": "a"}
    assert dups["c"].matched == "b" and "via copy b" in dups["c"].reason
    assert dups["c"].original_block == 1


def test_duplicate_input_errors():
    with pytest.raises(ValueError, match="duplicate hotkeys"):
        find_duplicates([Entry("a", "01", 1), Entry("a", "02", 2)], {})
    with pytest.raises(ValueError, match="threshold"):
        find_duplicates([], {}, threshold=0)
    with pytest.raises(ValueError, match="finite"):
        find_duplicates([Entry("a", "01", 1), Entry("b", "02", 2)], {("a", "b"): math.nan})


def test_seeded_tiebreak_is_deterministic_and_seed_dependent():
    assert seeded_tiebreak("a", "0xabc") == seeded_tiebreak("a", "0xabc")
    orders = {
        tuple(sorted("abcdef", key=lambda h, s=seed: seeded_tiebreak(h, s))) for seed in "0123"
    }
    assert len(orders) > 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)), max_size=7),
    st.randoms(use_true_random=False),
)
def test_duplicates_are_order_independent_and_point_to_earlier_originals(spec, rnd):
    entries = [Entry(f"h{i}", f"d{dg}", blk, tb) for i, (dg, blk, tb) in enumerate(spec)]

    def sim(x, y):  # similar when hotkey numbers share parity
        return 0.99 if int(x[1:]) % 2 == int(y[1:]) % 2 else 0.0

    dups = find_duplicates(entries, sim)
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert find_duplicates(shuffled, sim) == dups
    by_key = {e.hotkey: e for e in entries}
    for d in dups.values():
        assert d.original not in dups
        assert by_key[d.original].order() < by_key[d.hotkey].order()


# ----------------------------------------------------------------------------- EMA, weights


def test_final_scores_zero_duplicates():
    scores = {"a": Score(0.3, OK, ""), "b": Score(0.2, OK, "")}
    dup = Duplicate("b", "a", "a", "digest", None, 2, 1)
    assert final_scores(scores, {"b": dup}) == {"a": 0.3, "b": 0.0}


def test_moving_average_blends_decays_and_forgets():
    prev = {"a": 1.0, "b": 0.5, "gone": 0.2}
    cur = {"a": 0.0, "b": 1.0, "new": 0.4}
    out = moving_average(prev, cur, alpha=0.25)
    assert out == pytest.approx({"a": 0.75, "b": 0.625, "gone": 0.15, "new": 0.1})
    # Absent every round: geometric decay toward 0.
    x = {"a": 1.0}
    for _ in range(3):
        x = moving_average(x, {}, alpha=0.5)
    assert x == pytest.approx({"a": 0.125})
    assert moving_average(prev, cur, alpha=1.0) == {"b": 1.0, "new": 0.4}  # zeros dropped
    assert set(moving_average(prev, cur, 0.25, registered={"a", "new"})) == {"a", "new"}


@pytest.mark.parametrize(
    "prev, cur, alpha",
    [({}, {}, 0.0), ({}, {}, 1.5), ({"a": -1.0}, {}, 0.5), ({}, {"a": math.nan}, 0.5)],
)
def test_moving_average_rejects_bad_input(prev, cur, alpha):
    with pytest.raises(ValueError):
        moving_average(prev, cur, alpha)


def test_weights_normalise_positive_scores():
    uids, w = weights_from_scores({7: 0.3, 2: 0.1, 5: 0.0})
    assert uids == [2, 7] and w == pytest.approx([0.25, 0.75])
    assert u16_weights(uids, w) == ([2, 7], [21845, 65535])
    assert weights_from_scores({1: 0.0, 2: 0.0}) == ([], [])
    assert weights_from_scores({}) == ([], [])


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_weights_reject_bad_scores(bad):
    with pytest.raises(ValueError, match="finite and >= 0"):
        weights_from_scores({1: 0.5, 2: bad})


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.integers(0, 255), st.floats(0, 1e308), max_size=20))
def test_weights_sum_to_one(scores):
    uids, w = weights_from_scores(scores)
    assert uids == sorted(uids) and set(uids) <= {u for u, s in scores.items() if s > 0}
    if any(s > 0 for s in scores.values()):
        assert math.fsum(w) == pytest.approx(1.0) and all(x > 0 for x in w)


# ----------------------------------------------------------------------------- explain


def test_explain_rows_codes_reasons_and_order():
    uids = {"good": 1, "noisy": 2, "copier": 3, "broken": 4, "idle": 5, "old": 6}
    scores = {
        "good": Score(0.04, OK, "math: loss improved"),
        "noisy": Score(0.0, NO_IMPROVEMENT, "not distinguishable from noise"),
        "copier": Score(0.04, OK, "copied numbers"),
        "ghost": Score(0.01, OK, "scored, then deregistered"),
    }
    dups = {"copier": Duplicate("copier", "good", "good", "digest", None, 9, 8)}
    rows = explain_rows(
        uids,
        scores=scores,
        duplicates=dups,
        invalid={"broken": "download failed: 404"},
        averages={"good": 0.03, "old": 0.02},
        weights={1: 0.6, 6: 0.4},
    )
    by = {r.hotkey: r for r in rows}
    assert [r.hotkey for r in rows] == ["good", "old", "ghost", "noisy", "copier", "broken", "idle"]
    assert (by["good"].uid, by["good"].score, by["good"].weight, by["good"].code) == (
        1,
        0.04,
        0.6,
        OK,
    )
    assert by["copier"].code == DUPLICATE and by["copier"].score == 0.0
    assert "duplicate of good" in by["copier"].reason
    assert by["broken"].code == INVALID and by["broken"].reason == "download failed: 404"
    assert by["idle"].code == NO_SUBMISSION
    assert by["old"].code == NO_SUBMISSION and "moving average" in by["old"].reason
    assert by["old"].average == 0.02
    assert by["ghost"].uid is None and "not registered" in by["ghost"].reason
    assert by["noisy"].code == NO_IMPROVEMENT


def test_a_consistent_but_tiny_gain_below_the_floor_earns_nothing():
    # Noise on a barely trained model can shift every batch by the same 1e-5 nats: a tight,
    # positive bound that nobody worked for. The floor zeroes it; a real gain passes.
    tiny = stats(2e-5, 1e-6)
    assert tiny.lcb > 0
    s = score_submission(tiny, stats(0.0, 0.001), general_tolerance=0.01, min_improvement=1e-4)
    assert s.code == NO_IMPROVEMENT and s.value == 0.0
    assert "minimum improvement 0.0001" in s.reason
    real = score_submission(
        stats(0.004, 0.001), stats(0.0, 0.001), general_tolerance=0.01, min_improvement=1e-4
    )
    assert real.code == OK and real.value == pytest.approx(0.003)
    with pytest.raises(ValueError, match="min_improvement"):
        score_submission(tiny, stats(0.0, 0.001), general_tolerance=0.01, min_improvement=-1)
