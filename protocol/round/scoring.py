"""Validator scoring: paired confidence bounds, duplicates, moving average and weights.

Pure functions over plain data (no torch, no numpy), so every rule is tested with tiny inputs.
The validator's pipeline for one round reads:

    domain = paired_stats(base_domain_losses, delta_domain_losses)
    general = paired_stats(base_general_losses, delta_general_losses)
    score = score_submission(domain, general, general_tolerance=tol, domain_name="math")
    dups = find_duplicates(entries, cosine_by_pair)            # cosines computed elsewhere
    round_scores = final_scores(scores_by_hotkey, dups)        # duplicates zeroed
    averages = moving_average(previous_averages, round_scores, alpha)
    uids, weights = weights_from_scores({uid_of[h]: s for h, s in averages.items()})
    chain.set_weights(round, uids, weights, salt)              # the reveal; u16 by the chain
    rows = explain_rows(uid_of, scores=..., duplicates=dups, averages=..., weights=...)

Rules (and why, against what peers did; see docs/peers.md):
- The score is the one-sided lower confidence bound (Student t) of the paired per-batch loss
  improvement, so the size of an improvement counts (not just the rank) and noise is not paid.
- A non-finite loss on any batch invalidates the whole delta: dropping such batches rewarded
  checkpoints that blow up on hard inputs.
- General-data regression beyond a tolerance zeroes the score (forgetting guard).
- Copies (same digest, or delta cosine >= threshold) get nothing; the earliest committer keeps
  the credit, and chains of copies all point at that original.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from protocol.round.stats import t_quantile

# Score codes, as printed by `moesaic validator explain`.
OK = "ok"
NO_IMPROVEMENT = "no_improvement"
GENERAL_REGRESSION = "general_regression"
INVALID = "invalid"
DUPLICATE = "duplicate"
NO_SUBMISSION = "no_submission"
CODES = (OK, NO_IMPROVEMENT, GENERAL_REGRESSION, INVALID, DUPLICATE, NO_SUBMISSION)

# Reasons a paired evaluation is invalid (PairedStats.invalid).
NON_FINITE = "non_finite"
TOO_FEW_BATCHES = "too_few_batches"

DEFAULT_CONFIDENCE = 0.95

# ----------------------------------------------------------------------------- paired stats


@dataclass(frozen=True)
class PairedStats:
    """Paired per-batch improvement d_b = base_b - new_b (positive = the delta lowered the loss).

    `lcb`/`ucb` are one-sided bounds at `confidence` each (so [lcb, ucb] is a two-sided interval
    at 2 * confidence - 1). When `invalid` is set (NON_FINITE or TOO_FEW_BATCHES) the numbers
    are NaN and `detail` says why; NaN fails every `> 0` check, so a forgotten check pays nothing.
    """

    n: int
    mean: float
    stdev: float
    stderr: float
    lcb: float
    ucb: float
    confidence: float = DEFAULT_CONFIDENCE
    invalid: str | None = None
    detail: str = ""

    @property
    def valid(self) -> bool:
        return self.invalid is None

    @classmethod
    def failed(cls, n: int, code: str, detail: str, confidence: float) -> PairedStats:
        nan = math.nan
        return cls(n, nan, nan, nan, nan, nan, confidence, invalid=code, detail=detail)


def paired_stats(
    base: list[float], new: list[float], *, confidence: float = DEFAULT_CONFIDENCE
) -> PairedStats:
    """Mean, spread and one-sided Student-t bounds of the paired improvement base_b - new_b.

    Contract:
    - `base` and `new` are per-batch mean losses over the SAME batches in the same order.
    - A non-finite value in `new` (or a non-finite difference) makes the result invalid
      (NON_FINITE): no batch is ever dropped, a delta must evaluate on all of them.
    - Fewer than 2 batches is invalid (TOO_FEW_BATCHES): no variance, no bound.
    - Caller errors raise ValueError: different lengths, non-finite `base` (the validator's own
      base evaluation is broken; that is not the miner's fault), confidence outside [0.5, 1).
    """
    if len(base) != len(new):
        raise ValueError(f"paired evaluation needs equal lengths: {len(base)} base, {len(new)} new")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    bad_base = [i for i, x in enumerate(base) if not math.isfinite(x)]
    if bad_base:
        raise ValueError(f"base loss is non-finite on batches {bad_base}: fix the base evaluation")
    n = len(new)
    diffs = [b - x for b, x in zip(base, new, strict=True)]
    bad = [i for i, d in enumerate(diffs) if not math.isfinite(d)]
    if bad:
        shown = ", ".join(f"#{i}={new[i]}" for i in bad[:5])
        detail = f"non-finite loss on {len(bad)} of {n} batches ({shown})"
        return PairedStats.failed(n, NON_FINITE, detail, confidence)
    if n < 2:
        return PairedStats.failed(n, TOO_FEW_BATCHES, f"{n} batch(es); need >= 2", confidence)
    mean = math.fsum(diffs) / n
    stdev = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    stderr = stdev / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * stderr
    return PairedStats(n, mean, stdev, stderr, mean - half, mean + half, confidence)


# ----------------------------------------------------------------------------- score


@dataclass(frozen=True)
class Score:
    """One submission's score this round. `value` >= 0 is what enters the moving average.

    The measured numbers are None when the evaluation was invalid.
    """

    value: float
    code: str
    reason: str
    domain_lcb: float | None = None
    domain_mean: float | None = None
    general_mean: float | None = None


def _f(x: float) -> str:
    return f"{x:.4g}"


def score_submission(
    domain: PairedStats,
    general: PairedStats,
    *,
    general_tolerance: float,
    domain_name: str = "domain",
    min_improvement: float = 0.0,
) -> Score:
    """Score = max(0, domain LCB), zeroed by an invalid evaluation or a general regression.

    Checks, first match wins: INVALID (either evaluation invalid), GENERAL_REGRESSION,
    NO_IMPROVEMENT (domain lcb <= min_improvement), OK.

    `min_improvement` (nats/batch) is the smallest lower bound that pays. The paired test is
    exact about deterministic effects: random noise added to a barely trained model can shift
    every batch's loss by the same ~1e-5 nats, a "significant" gain nobody worked for. The
    floor puts such changes at zero; it should sit well below what a round of training gives.

    General regression rule (a decision): the score is zeroed when the one-sided upper bound of
    the general loss INCREASE exceeds `general_tolerance`, i.e. `-general.lcb > tolerance`, not
    merely when the mean rise does. The miner carries the burden of proof on both sides, as for
    the domain gain, so a noisy delta cannot hide forgetting behind noise. Consequence for
    operators: the tolerance must exceed the noise of a no-op delta on the general set
    (t * stderr); reasons print the bound so it can be tuned.
    """
    if not (math.isfinite(general_tolerance) and general_tolerance >= 0):
        raise ValueError(f"general_tolerance must be finite and >= 0, got {general_tolerance}")
    if not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise ValueError(f"min_improvement must be finite and >= 0, got {min_improvement}")
    for name, s in ((domain_name, domain), ("general", general)):
        if not s.valid:
            return Score(0.0, INVALID, f"{name} evaluation invalid ({s.invalid}): {s.detail}")
    level = f"{domain.confidence:.0%}"
    gain = (
        f"{domain_name}: loss improvement {_f(domain.mean)} nats/batch "
        f"({level} bounds {_f(domain.lcb)}..{_f(domain.ucb)}, {domain.n} batches)"
    )
    rise_ucb = -general.lcb
    measured = {
        "domain_lcb": domain.lcb,
        "domain_mean": domain.mean,
        "general_mean": general.mean,
    }
    if rise_ucb > general_tolerance:
        reason = (
            f"general: loss rise {_f(-general.mean)} nats/batch ({general.confidence:.0%} upper "
            f"bound {_f(rise_ucb)} > tolerance {_f(general_tolerance)}); {gain}"
        )
        return Score(0.0, GENERAL_REGRESSION, reason, **measured)
    guard = (
        f"general: loss rise {_f(-general.mean)} ({general.confidence:.0%} upper bound "
        f"{_f(rise_ucb)} <= tolerance {_f(general_tolerance)})"
    )
    if not domain.lcb > min_improvement:
        floor = (
            "0, not distinguishable from noise"
            if min_improvement == 0
            else (f"the minimum improvement {_f(min_improvement)}")
        )
        reason = f"{gain}: lower bound <= {floor}; {guard}"
        return Score(0.0, NO_IMPROVEMENT, reason, **measured)
    return Score(domain.lcb, OK, f"{gain}; {guard}", **measured)


# ----------------------------------------------------------------------------- duplicates


@dataclass(frozen=True)
class Entry:
    """One commitment to compare. Earlier = smaller (commit_block, tiebreak, hotkey).

    `tiebreak` orders commitments in the same block: the extrinsic index when the chain gives
    it, else `seeded_tiebreak(hotkey, seed)` so no fixed uid always wins ties.
    """

    hotkey: str
    digest: str
    commit_block: int
    tiebreak: int = 0

    def order(self) -> tuple[int, int, str]:
        return (self.commit_block, self.tiebreak, self.hotkey)


@dataclass(frozen=True)
class Duplicate:
    """`hotkey` copied `original` (the earliest commitment its copy chain leads to).

    `matched` is the earlier commitment it matched directly (== original unless it copied a
    copy); `kind` is "digest" (same artifact), "similarity" (delta cosine >= threshold) or
    "function" (function fingerprint cosine >= its threshold, protocol.artifact.fingerprint).
    """

    hotkey: str
    original: str
    matched: str
    kind: str
    similarity: float | None
    block: int
    original_block: int

    @property
    def reason(self) -> str:
        if self.kind == "digest":
            how = "same artifact digest"
        elif self.kind == "function":
            how = f"function similarity {self.similarity:.4f} on the validator's secret probes"
        else:
            how = f"delta cosine similarity {self.similarity:.4f}"
        via = "" if self.matched == self.original else f", via copy {self.matched}"
        return (
            f"duplicate of {self.original} (committed at block {self.original_block}, "
            f"this at {self.block}): {how}{via}; the earlier committer keeps the credit"
        )


def seeded_tiebreak(hotkey: str, seed: str) -> int:
    """A per-round pseudo-random tiebreak (e.g. seed = the round's block hash)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{hotkey}".encode()).digest()[:8], "big")


Similarity = Callable[[str, str], float] | Mapping[tuple[str, str], float]


def _lookup(similarity: Similarity, a: str, b: str) -> float | None:
    if callable(similarity):
        value = similarity(a, b)
    else:
        value = similarity.get((a, b), similarity.get((b, a)))
        if value is None:
            return None  # pair not compared (e.g. delta not loadable): no evidence of copying
    if not math.isfinite(value):
        raise ValueError(f"similarity of {a} and {b} is {value}; expected a finite cosine")
    return value


def find_duplicates(
    entries: list[Entry],
    similarity: Similarity,
    threshold: float = 0.95,
    *,
    function_similarity: Similarity | None = None,
    function_threshold: float = 1.0,
) -> dict[str, Duplicate]:
    """Map each copying hotkey to its Duplicate record; originals are absent from the result.

    An entry is a copy when an EARLIER entry has the same digest, a similarity >= threshold, or
    a function similarity >= function_threshold (protocol.artifact.fingerprint: the same
    experts' outputs, whatever neuron order, sign or scale each delta uses). Its `matched` is
    the earliest such entry and its `original` is where that entry's own copy chain starts, so
    chains (C copies B copies A) all point at A even if C and A are not similar themselves.
    Similarities are called (or looked up, either key order) with two hotkeys; a missing pair
    in a mapping counts as not similar. Independent of input order.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not 0.0 < function_threshold <= 1.0:
        raise ValueError(f"function_threshold must be in (0, 1], got {function_threshold}")
    hotkeys = [e.hotkey for e in entries]
    if len(set(hotkeys)) != len(hotkeys):
        raise ValueError("duplicate hotkeys in entries")
    ordered = sorted(entries, key=Entry.order)
    found: dict[str, Duplicate] = {}
    for i, later in enumerate(ordered):
        for earlier in ordered[:i]:
            match = _match(
                earlier, later, similarity, threshold, function_similarity, function_threshold
            )
            if match is None:
                continue
            kind, sim = match
            root = found.get(earlier.hotkey)
            original = root.original if root else earlier.hotkey
            original_block = root.original_block if root else earlier.commit_block
            found[later.hotkey] = Duplicate(
                later.hotkey,
                original,
                earlier.hotkey,
                kind,
                sim,
                later.commit_block,
                original_block,
            )
            break
    return found


def _match(
    earlier: Entry,
    later: Entry,
    similarity: Similarity,
    threshold: float,
    function_similarity: Similarity | None,
    function_threshold: float,
) -> tuple[str, float | None] | None:
    """(kind, similarity) when `later` copies `earlier` by one of find_duplicates' rules."""
    if earlier.digest.lower() == later.digest.lower():
        return "digest", None
    sim = _lookup(similarity, earlier.hotkey, later.hotkey)
    if sim is not None and sim >= threshold:
        return "similarity", sim
    if function_similarity is not None:
        sim = _lookup(function_similarity, earlier.hotkey, later.hotkey)
        if sim is not None and sim >= function_threshold:
            return "function", sim
    return None


def final_scores(
    scores: Mapping[str, Score], duplicates: Mapping[str, Duplicate]
) -> dict[str, float]:
    """This round's score per hotkey as it enters the moving average: duplicates get 0."""
    out = {h: s.value for h, s in scores.items()}
    for h in duplicates:
        out[h] = 0.0
    return out


# ----------------------------------------------------------------------------- averages, weights


def _check_scores(scores: Mapping, what: str) -> None:
    for k, v in scores.items():
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{what} for {k!r} is {v!r}; scores must be finite and >= 0")


def moving_average(
    previous: Mapping[str, float],
    current: Mapping[str, float],
    alpha: float,
    *,
    registered: Collection[str] | None = None,
) -> dict[str, float]:
    """EMA per hotkey: alpha * current + (1 - alpha) * previous.

    Contract:
    - A hotkey absent from `current` scored 0 this round, so its average decays by (1 - alpha)
      per round toward 0; a new hotkey starts at alpha * score (credit is earned over rounds).
    - Keyed by hotkey, not uid: a uid re-registered by someone else starts from nothing.
    - `registered`, when given, drops every other hotkey (deregistered history is forgotten).
    - Exact zeros are dropped so the state only holds miners with credit.
    - Raises ValueError for alpha outside (0, 1] or a negative / non-finite score.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    _check_scores(previous, "previous average")
    _check_scores(current, "current score")
    out = {}
    for h in sorted(set(previous) | set(current)):
        if registered is not None and h not in registered:
            continue
        value = alpha * current.get(h, 0.0) + (1.0 - alpha) * previous.get(h, 0.0)
        if value > 0:
            out[h] = value
    return out


def weights_from_scores(scores: Mapping[int, float]) -> tuple[list[int], list[float]]:
    """Positive scores normalised to sum 1, uids ascending; zeros omitted.

    All zero (or empty) gives ([], []): the caller decides what an empty round means. Raises
    ValueError for negative, NaN or infinite scores. The output feeds `protocol.chain.u16_weights`.
    """
    _check_scores(scores, "score")
    positive = sorted((uid, float(s)) for uid, s in scores.items() if s > 0)
    if not positive:
        return [], []
    # Scale by the maximum first so the sum cannot overflow; filter after dividing, since a
    # subnormal score can underflow to a zero weight.
    top = max(s for _, s in positive)
    total = math.fsum(s / top for _, s in positive)
    pairs = [(u, s / top / total) for u, s in positive if s / top / total > 0]
    return [u for u, _ in pairs], [w for _, w in pairs]


# ----------------------------------------------------------------------------- explain


@dataclass(frozen=True)
class ExplainRow:
    """One line of `moesaic validator explain`: why a miner has the weight it has.

    `score` is this round's (after duplicate zeroing), `average` the moving average the weight
    comes from; uid is None for a hotkey that is no longer registered.
    """

    uid: int | None
    hotkey: str
    score: float
    average: float
    weight: float
    code: str
    reason: str


def explain_rows(
    uids: Mapping[str, int],
    *,
    scores: Mapping[str, Score] | None = None,
    duplicates: Mapping[str, Duplicate] | None = None,
    invalid: Mapping[str, str] | None = None,
    averages: Mapping[str, float] | None = None,
    weights: Mapping[int, float] | None = None,
) -> list[ExplainRow]:
    """Rows for every registered hotkey and every hotkey with a record, highest weight first.

    `uids` maps registered hotkeys to uids; `invalid` holds hotkeys rejected before evaluation
    (download failed, digest mismatch, bad manifest) with a reason; `weights` is by uid. The
    code per hotkey, first match wins: duplicate, invalid, its Score's code, no_submission.
    Sorted by weight, then score (both descending), then uid, then hotkey.
    """
    scores, duplicates = scores or {}, duplicates or {}
    invalid, averages, weights = invalid or {}, averages or {}, weights or {}
    rows = []
    for h in sorted(set(uids) | set(scores) | set(duplicates) | set(invalid)):
        score = 0.0
        if h in duplicates:
            code, reason = DUPLICATE, duplicates[h].reason
        elif h in invalid:
            code, reason = INVALID, invalid[h]
        elif h in scores:
            score, code, reason = scores[h].value, scores[h].code, scores[h].reason
        else:
            code, reason = NO_SUBMISSION, "no commitment evaluated this round"
        uid = uids.get(h)
        average = averages.get(h, 0.0)
        weight = weights.get(uid, 0.0) if uid is not None else 0.0
        if uid is None:
            reason += "; hotkey not registered: no weight"
        elif score == 0 and weight > 0:
            reason += "; weight comes from the moving average of earlier rounds"
        rows.append(ExplainRow(uid, h, score, average, weight, code, reason))
    none_last = 1 << 62
    rows.sort(key=lambda r: (-r.weight, -r.score, none_last if r.uid is None else r.uid, r.hotkey))
    return rows
