"""The merger's pure core: the validators' robust consensus and standing (the rule:
protocol/round/consensus.py), the guard's decision (settings: merger/settings.py).

No I/O here; merger/node.py is the effectful shell that measures candidates and publishes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.identity.hashing import sha256_json
from protocol.identity.keys import normalise
from protocol.round.consensus import robust_consensus, start_standing, update_standing

MERGED, BEST_SINGLE, KEPT_PREVIOUS = "merged", "best_single", "kept_previous"  # guard decisions
COMPOSED = "composed"  # several tasks' chosen deltas, united
# A manifest refused with one of these may belong to another task the merger composes.
OTHER_TASK_CODES = ("wrong_task", "wrong_assignment")


# ----------------------------------------------------------------------------- pure core


def validator_consensus(
    weights: Mapping[int, Mapping[int, int]],
    members: Sequence,
    previous_standing: Mapping[str, float],
    alpha: float,
) -> tuple[dict[int, float], dict[str, dict], dict[str, float]]:
    """(miner uid -> consensus weight, validator records, standing to carry to the next round).

    `weights` as the chain holds them ({validator uid: {miner uid: u16}}), `members` the
    chain's (uid, hotkey, validator_permit), `previous_standing` the carried map (normalised
    hotkey -> standing, protocol.round.consensus). Only permitted validators vote; standing is
    keyed by hotkey, so a uid re-registered by another key does not inherit it. Each permitted
    validator's record: uid, hotkey, voted, standing (used this round), agreement (None if it
    did not vote or nothing had consensus), standing_after. Miners without consensus weight are
    absent, so they are never merged.
    """
    hotkey_of = {m.uid: m.hotkey for m in members}
    permitted = {normalise(m.hotkey): m for m in members if m.validator_permit}
    standing = start_standing(previous_standing, permitted)
    votes = {normalise(hotkey_of[v]): w for v, w in weights.items() if v in hotkey_of}
    votes = {h: w for h, w in votes.items() if h in permitted}
    result = robust_consensus(votes, standing)
    carried = update_standing({**previous_standing, **standing}, result.agreement, alpha)
    records = {
        h: dict(
            uid=m.uid,
            hotkey=m.hotkey,
            voted=h in votes,
            standing=standing[h],
            agreement=result.agreement.get(h),
            standing_after=carried[h],
        )
        for h, m in sorted(permitted.items())
    }
    return result.weights, records, dict(sorted(carried.items()))


def guard(
    candidates: dict[str, dict], tolerance: float, cumulative_tolerance: float = math.inf
) -> tuple[str, str | None, str]:
    """(decision, chosen candidate name or None, reason) from measured candidates.

    `candidates` maps "merged" and each single hotkey to {"domain_mean", "general_rise"}
    (general_rise: upper bound of the general-loss rise over the round's base) and optionally
    "cumulative_rise" (the same over the task's original base, protocol.round.drift; absent
    while the round builds on that base). A candidate passes the general check when both rises
    are within their tolerances. The merge is taken if its domain loss is <= every single's and
    it passes; else the single with the lowest domain loss if it passes; else nothing (keep the
    previous).
    """
    singles = {k: c for k, c in candidates.items() if k != MERGED}
    best = min(singles, key=lambda k: (singles[k]["domain_mean"], k))
    m, b = candidates[MERGED], singles[best]
    ok = lambda c: general_problem(c, tolerance, cumulative_tolerance) is None  # noqa: E731
    if ok(m) and m["domain_mean"] <= b["domain_mean"]:
        return MERGED, MERGED, "merge beats the best single delta and passes the general check"
    why = (
        f"merge domain loss {m['domain_mean']:.5g} > best single {b['domain_mean']:.5g}"
        if ok(m)
        else f"merge {general_problem(m, tolerance, cumulative_tolerance)}"
    )
    if ok(b):
        return BEST_SINGLE, best, f"{why}; using the best single delta ({best})"
    reason = f"{why}; best single {best} {general_problem(b, tolerance, cumulative_tolerance)}"
    return KEPT_PREVIOUS, None, reason


def general_problem(c: dict, tolerance: float, cumulative_tolerance: float) -> str | None:
    """Why a measured candidate fails the general check (per round, then cumulative), or None."""
    rise = c["general_rise"]
    if not (math.isfinite(rise) and rise <= tolerance):
        return f"general rise {rise:.5g} over tolerance {tolerance}"
    total = c.get("cumulative_rise", -math.inf)  # absent: the round's base is the original
    if not (total is not None and total <= cumulative_tolerance):  # inf/nan fail too
        return (
            f"cumulative general rise {total:.5g} over cumulative tolerance {cumulative_tolerance}"
        )
    return None


@dataclass(frozen=True)
class TaskSpec:
    """One task the merger merges: its id, expert assignment and domain (its guard's data)."""

    task_id: int
    assignment: Any  # protocol.moe.experts.Assignment
    domain_spec: str


def check_disjoint(tasks: Sequence[TaskSpec]) -> None:
    """Tasks composed into one checkpoint must train disjoint experts (and differ in id)."""
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task ids repeat: {ids}")
    seen: dict[tuple[int, int], int] = {}
    for t in tasks:
        for pair in t.assignment.pairs():
            if pair in seen:
                raise ValueError(
                    f"tasks {seen[pair]} and {t.task_id} both train layer {pair[0]} expert "
                    f"{pair[1]}; select one with `moesaic experts select --exclude` the other"
                )
            seen[pair] = t.task_id


def deltas_digest(included: Sequence[Sequence]) -> str:
    """sha256 of the canonical JSON list of [hotkey, artifact sha256, weight] included."""
    return sha256_json([list(x) for x in included])
