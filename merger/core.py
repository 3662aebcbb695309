"""The merger's pure core: the validators' robust consensus and standing (the rule:
protocol/round/consensus.py), which measured deltas may be merged this round (`split_by_score`:
the validators' scoring rule), the seed of the guard's second batch set (`guard_seed`) and the
guard's decision (`guard`; settings: merger/settings.py).

No I/O here; merger/node.py is the effectful shell that measures candidates and publishes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from protocol.identity.hashing import sha256_json
from protocol.identity.keys import normalise
from protocol.round.consensus import robust_consensus, start_standing, update_standing
from protocol.round.scoring import OK

MERGED, BEST_SINGLE, KEPT_PREVIOUS = "merged", "best_single", "kept_previous"  # guard decisions
COMPOSED = "composed"  # several tasks' chosen deltas, united
# A manifest refused with one of these may belong to another task the merger composes.
OTHER_TASK_CODES = ("wrong_task", "wrong_assignment")
# Mixed into the round's eval seed to draw the guard's second, independent set of batches.
GUARD_SEED_LABEL = "moesaic-merger-guard-set"


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


def split_by_score(measured: Mapping[str, dict]) -> tuple[list[str], dict[str, dict]]:
    """(hotkeys that may be merged, sorted; {hotkey: {"code", "reason"}} of the others).

    `measured` maps each readable delta to its measurement on the round's selection batches,
    with "score_code" and "score_reason" from the validators' scoring rule
    (protocol.round.scoring.score_submission, then protocol.round.drift.cumulative_guard). Only a
    delta the rule pays (code "ok": the domain gain's lower bound over the round's base exceeds
    min_improvement and the general checks pass) is merged, whatever the validators' moving
    averages say: a delta that did not improve the domain THIS round never enters the merge.
    """
    included = sorted(h for h, m in measured.items() if m["score_code"] == OK)
    excluded = {
        h: {"code": m["score_code"], "reason": m["score_reason"]}
        for h, m in sorted(measured.items())
        if m["score_code"] != OK
    }
    return included, excluded


def best_single(measured: Mapping[str, dict]) -> str:
    """The single delta with the lowest domain loss (ties: the smallest hotkey)."""
    if not measured:
        raise ValueError("no single delta to choose from")
    return min(measured, key=lambda k: (measured[k]["domain_mean"], k))


def guard_seed(eval_seed: int) -> int:
    """63-bit seed of the guard's second batch set: sha256 of GUARD_SEED_LABEL and the round's
    eval seed (protocol.moe.evaluate.eval_seed), so anyone holding the chain can redraw it and
    nobody could know it before the commit deadline."""
    if not isinstance(eval_seed, int) or isinstance(eval_seed, bool) or eval_seed < 0:
        raise ValueError(f"eval_seed must be a non-negative integer, got {eval_seed!r}")
    digest = hashlib.sha256(f"{GUARD_SEED_LABEL}|{eval_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def guard(
    candidates: dict[str, dict],
    tolerance: float,
    cumulative_tolerance: float = math.inf,
    base_domain_mean: float | None = None,
) -> tuple[str, str | None, str]:
    """(decision, chosen candidate name or None, reason) from measured candidates.

    `candidates` maps "merged" and each single hotkey to {"domain_mean", "general_rise"}
    (general_rise: upper bound of the general-loss rise over the round's base) and optionally
    "cumulative_rise" (the same over the task's original base, protocol.round.drift; absent
    while the round builds on that base). A candidate passes when both rises are within their
    tolerances and, given `base_domain_mean` (the round's base on the same batches), its domain
    loss is below the base's. The merge is taken if its domain loss is <= every single's and it
    passes; else the single with the lowest domain loss if it passes; else nothing (keep the
    previous). The merger calls it with the numbers of its SECOND batch set only (the merge and
    the single chosen on the selection set), so a candidate that won only on the batches it was
    chosen on is not published on that strength.
    """
    singles = {k: c for k, c in candidates.items() if k != MERGED}
    best = best_single(singles)
    m, b = candidates[MERGED], singles[best]

    def problem(c: dict) -> str | None:
        general = general_problem(c, tolerance, cumulative_tolerance)
        if general is not None or base_domain_mean is None:
            return general
        if not c["domain_mean"] < base_domain_mean:  # NaN fails too
            return f"domain loss {c['domain_mean']:.5g} not below the base's {base_domain_mean:.5g}"
        return None

    if problem(m) is None and m["domain_mean"] <= b["domain_mean"]:
        return MERGED, MERGED, "merge beats the best single delta and passes the general check"
    why = (
        f"merge domain loss {m['domain_mean']:.5g} > best single {b['domain_mean']:.5g}"
        if problem(m) is None
        else f"merge {problem(m)}"
    )
    if problem(b) is None:
        return BEST_SINGLE, best, f"{why}; using the best single delta ({best})"
    reason = f"{why}; best single {best} {problem(b)}"
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


def kept_record(reason: str) -> dict:
    """A merge record that keeps the previous checkpoint."""
    return dict(
        decision=KEPT_PREVIOUS, reason=reason, included=[], deltas_digest=None, delta_path=None,
        candidates={},
    )  # fmt: skip


def deltas_digest(included: Sequence[Sequence]) -> str:
    """sha256 of the canonical JSON list of [hotkey, artifact sha256, weight] included."""
    return sha256_json([list(x) for x in included])
