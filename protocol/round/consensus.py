"""Robust consensus of the validators' weights and each validator's standing (Yuma-like).

Pure functions over plain data, so the rule is tested with tiny inputs and anyone holding the
chain's weights and the previous standing can recompute what the merger recorded:

    standing = start_standing(previous, permitted_hotkeys)      # carried across rounds
    result = robust_consensus(votes_by_hotkey, standing)         # this round
    carried = update_standing(previous, result.agreement, alpha)

The rule, per round (as Bittensor's Yuma consensus does with stake, here with standing):
- Each validator's weight vector is normalised to sum 1 (an all-zero vector stays zero).
- For each miner, the standing-weighted median of the validators' weights for it (kappa = 0.5
  of the standing; where the cumulative standing reaches exactly half, the mean of the two
  middle values). Each validator's weight is clipped at that median, the clipped weights are
  averaged by standing and the result renormalised: the miner's consensus weight.
- A validator's agreement is sum over miners of min(its weight, consensus weight), in [0, 1];
  its standing is a moving average of its agreement over rounds.

What it tolerates: while the colluding validators hold less than half of the standing, every
miner's median lies within the range of the honest validators' weights for it, so no colluder
can lift a miner above what some honest validator gives it; a miner that every honest
validator gives 0 gets consensus 0. With equal standing that is at most ceil(N/2) - 1
colluders of N (1 of 3, 1 of 4, 2 of 5). With 2 validators of equal standing each holds exactly
half, the median is the mean of the two and one validator can move the consensus as far as the
plain mean lets it: two validators cannot tell which of them is lying (tested, see
tests/unit/test_consensus.py). A validator that copies the previous round's weights agrees less
whenever the miners' scores move between rounds, and so loses standing; while they do not move,
copying is indistinguishable from evaluating (the weights commit-then-reveal keeps it from
copying the current round).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

KAPPA = 0.5  # the share of standing a miner's median weight must be supported by
GENESIS_STANDING = 1.0  # every permitted validator's standing when nobody has a history
DEFAULT_STANDING_ALPHA = 0.3  # weight of this round's agreement in the standing's moving average


@dataclass(frozen=True)
class RoundConsensus:
    """One round's outcome: miner weights, and per voting validator its agreement.

    `weights`: miner uid -> consensus weight, positive only, summing to 1 (empty when no miner
    has support). `medians`: miner uid -> the standing-weighted median its weights were clipped
    at. `agreement`: validator -> sum over miners of min(own normalised weight, consensus
    weight); None for every validator when the consensus is empty (nothing to agree with).
    """

    weights: dict[int, float]
    medians: dict[int, float]
    agreement: dict[Hashable, float | None]


def normalised(vector: Mapping[int, float]) -> dict[int, float]:
    """Weights divided by their sum; an all-zero (or empty) vector gives all zeros.

    Raises ValueError for a negative or non-finite weight: the chain stores u16 values, so one
    would mean a broken client, never a vote.
    """
    for uid, w in vector.items():
        if not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight for uid {uid} must be finite and >= 0, got {w!r}")
    total = math.fsum(vector.values())
    return {uid: (w / total if total > 0 else 0.0) for uid, w in vector.items()}


def weighted_median(values: Iterable[float], weights: Iterable[float]) -> float:
    """The value where the cumulative weight, from the smallest value up, reaches half.

    Where it reaches exactly half at some value, the mean of that value and the next one (so
    two equal weights give the mean of the two, as the ordinary median does). Zero weights do
    not count; if every weight is zero, all count equally. Raises ValueError on no values.
    """
    pairs = sorted(zip(values, weights, strict=True))
    if not pairs:
        raise ValueError("the median of no values")
    if all(w <= 0 for _, w in pairs):
        pairs = [(v, 1.0) for v, _ in pairs]
    pairs = [(v, w) for v, w in pairs if w > 0]
    half, cumulative = math.fsum(w for _, w in pairs) * KAPPA, 0.0
    for i, (v, w) in enumerate(pairs):
        cumulative += w
        if math.isclose(cumulative, half, rel_tol=1e-12, abs_tol=0.0) and i + 1 < len(pairs):
            return (v + pairs[i + 1][0]) / 2
        if cumulative >= half:
            return v
    return pairs[-1][0]  # unreachable: the cumulative sum ends at twice half


def robust_consensus(
    votes: Mapping[Hashable, Mapping[int, float]], standing: Mapping[Hashable, float]
) -> RoundConsensus:
    """Median-clipped, standing-weighted consensus of the voters' weights (module doc).

    `votes`: validator -> {miner uid: weight} as set on chain (any scale; normalised here).
    `standing`: validator -> standing >= 0; every voter must have one (start_standing gives
    them). No voters gives an empty consensus.
    """
    missing = [v for v in votes if v not in standing]
    if missing:
        raise ValueError(f"voters without a standing: {sorted(map(str, missing))}")
    bad = {v: s for v, s in standing.items() if not (math.isfinite(s) and s >= 0)}
    if bad:
        raise ValueError(f"standing must be finite and >= 0: {bad}")
    voters = sorted(votes, key=str)
    rows = {v: normalised(votes[v]) for v in voters}
    stake = {v: float(standing[v]) for v in voters}
    if voters and math.fsum(stake.values()) <= 0:
        stake = dict.fromkeys(voters, 1.0)  # nobody has standing left: count everyone equally
    total = math.fsum(stake.values())
    miners = sorted({uid for row in rows.values() for uid in row})
    medians, clipped = {}, {}
    for uid in miners:
        column = [rows[v].get(uid, 0.0) for v in voters]
        medians[uid] = m = weighted_median(column, [stake[v] for v in voters])
        clipped[uid] = (
            math.fsum(stake[v] * min(w, m) for v, w in zip(voters, column, strict=True)) / total
        )
    mass = math.fsum(clipped.values())
    weights = {u: c / mass for u, c in clipped.items() if c > 0} if mass > 0 else {}
    agreement: dict[Hashable, float | None] = {
        v: (math.fsum(min(w, weights.get(u, 0.0)) for u, w in rows[v].items()) if weights else None)
        for v in voters
    }
    return RoundConsensus(weights=weights, medians=medians, agreement=agreement)


def start_standing(previous: Mapping[str, float], permitted: Iterable[str]) -> dict[str, float]:
    """Each permitted validator's standing for this round: its carried one, else a start.

    With no history at all every validator starts at GENESIS_STANDING (equal); a validator
    permitted later starts at the median of the carried standings, so a new key neither
    outranks the established validators nor is muted by them.
    """
    start = statistics.median(previous.values()) if previous else GENESIS_STANDING
    return {h: float(previous.get(h, start)) for h in permitted}


def update_standing(
    standing: Mapping[str, float], agreement: Mapping[str, float | None], alpha: float
) -> dict[str, float]:
    """Standing after this round: alpha * agreement + (1 - alpha) * standing, per voter.

    Validators that did not vote, or voted in a round with an empty consensus (agreement None),
    keep their standing: a round without evidence neither rewards nor punishes. Validators only
    in `agreement` start from GENESIS_STANDING.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    out = dict(standing)
    for v, a in agreement.items():
        if a is not None:
            out[v] = alpha * a + (1 - alpha) * out.get(v, GENESIS_STANDING)
    return out
